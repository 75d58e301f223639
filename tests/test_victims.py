"""Gentle victims (lending: overlap): recently checkpointed first, then the least work since the last
checkpoint; never a job ending within the spare window, a non-preemptible one, or a replica."""

from __future__ import annotations

import os
import pwd
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hpcserve.config import load_policy
from hpcserve.jobs.resumable import ResumableTask, mark_checkpoint, marker_path
from hpcserve.rebalance.victims import choose_eviction, choose_victims, lost_gpu_s, share_capped
from hpcserve.serving.overlap import checkpoint_times
from hpcserve.serving.tags import replica_tag
from hpcserve.slurm.models import Job, JobState
from tests.conftest import POLICY

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
P = load_policy(POLICY)
SPARE = 900.0
H = 3600


def train(job_id: int, node: str = "g1", gpus: int = 8, started_h: float = 2.0, limit_h: float = 24.0,
          partition: str = "train", tag: str | None = None) -> Job:  # fmt: skip
    """A running job; training's class fits (more than 4 GPUs or over 4 h: not the interactive class)."""
    start = NOW - timedelta(hours=started_h)
    return Job(str(job_id), job_id, f"j{job_id}", "bob", "acct", partition, JobState.RUNNING, 1, (node,),
               gpus=gpus, start=start, time_limit_s=int(limit_h * H), tag=tag)  # fmt: skip


def test_a_recent_checkpoint_goes_first() -> None:
    old, fresh = train(1, started_h=0.5), train(2, started_h=10)
    checkpoints = {"2": NOW - timedelta(seconds=60)}
    assert choose_victims([old, fresh], 8, checkpoints, NOW, SPARE, P) == [fresh]


def test_then_the_least_work_since_the_last_checkpoint() -> None:
    a = train(1, "g1", gpus=8, started_h=5)  # no marker: 5 h x 8 GPUs lost
    b = train(2, "g2", gpus=8, started_h=10)  # checkpointed 1 h ago: 1 h x 8 lost
    checkpoints = {"2": NOW - timedelta(hours=1)}
    eviction = choose_eviction([a, b], 8, checkpoints, NOW, SPARE, P)
    assert eviction is not None and eviction.node == "g2" and eviction.victims == (b,)
    assert eviction.lost_gpu_s == 8 * H
    assert lost_gpu_s(a, {}, NOW) == 5 * 8 * H  # falls back to the start


def test_never_a_job_ending_within_the_spare_window() -> None:
    ending = train(1, started_h=23.9, limit_h=24)  # 6 minutes left
    young = train(2, "g2", started_h=3)
    assert choose_victims([ending, young], 8, {}, NOW, SPARE, P) == [young]
    assert choose_victims([ending], 8, {}, NOW, SPARE, P) == []


def test_never_a_non_preemptible_job_nor_a_replica() -> None:
    interactive = train(1, gpus=4, limit_h=2, started_h=0.1)  # fits the interactive class: not preemptible
    replica = train(2, gpus=4, partition="infer", tag=replica_tag("llm", 0), started_h=0.1)
    assert choose_victims([interactive, replica], 4, {}, NOW, SPARE, P) == []


def test_takes_as_few_jobs_as_cover_the_need_on_one_node() -> None:
    small = [train(i, "g1", gpus=2, started_h=1 + i) for i in range(1, 4)]  # 2 GPUs each
    eviction = choose_eviction(small, 4, {}, NOW, SPARE, P, free_gpus={"g1": 0})
    assert eviction is not None and [j.id for j in eviction.victims] == ["1", "2"]  # least work first


def test_free_gpus_count_and_an_idle_node_costs_nothing() -> None:
    busy = train(1, "g1")
    eviction = choose_eviction([busy], 4, {}, NOW, SPARE, P, free_gpus={"g2": 4})
    assert eviction is not None and eviction.node == "g2" and eviction.victims == ()


def test_no_node_can_be_freed() -> None:
    assert choose_eviction([train(1, gpus=2)], 8, {}, NOW, SPARE, P) is None


def test_resumable_task_marks_its_checkpoints_and_the_service_reads_them(tmp_path: Path) -> None:
    env = {"HPCSERVE_CHECKPOINT_DIR": str(tmp_path), "SLURM_JOB_ID": "77"}
    assert marker_path(env) == tmp_path / "77"
    assert marker_path({**env, "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3"}) == tmp_path / "70_3"
    assert marker_path({"HPCSERVE_CHECKPOINT_MARKER": str(tmp_path / "m")}) == tmp_path / "m"
    assert marker_path({}) is None
    mark_checkpoint(env)
    os.utime(tmp_path / "77", (NOW.timestamp(), NOW.timestamp()))
    assert checkpoint_times(tmp_path, [("77", "root"), ("78", "root")]) == {"77": NOW}
    assert checkpoint_times(tmp_path, [("77", "bob")]) == {}  # root's file does not speak for bob's job
    os.chown(tmp_path / "77", pwd.getpwnam("bob").pw_uid, -1)
    assert checkpoint_times(tmp_path, [("77", "bob")]) == {"77": NOW}
    mark_checkpoint({"HPCSERVE_CHECKPOINT_MARKER": str(tmp_path / "missing" / "m")})  # silent


def test_a_resumable_task_save_touches_the_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCSERVE_CHECKPOINT_MARKER", str(tmp_path / "marker"))
    monkeypatch.delenv("SLURM_PROCID", raising=False)

    class Count(ResumableTask[int]):
        def initial_state(self) -> dict[str, int]:
            return {"n": 0}

        def step(self, state: dict[str, int]) -> dict[str, int]:
            return {"n": state["n"] + 1}

        def finished(self, state: dict[str, int]) -> bool:
            return state["n"] >= 3

        def result(self, state: dict[str, int]) -> int:
            return state["n"]

    assert Count(tmp_path / "state.json")() == 3
    assert (tmp_path / "marker").exists()


def test_overload_keeps_the_policys_side_limits() -> None:
    shared = frozenset({"s1", "s2", "s3"})
    infer, training = frozenset({"i1"}) | shared, frozenset({"t1", "t2"}) | shared
    replicas = [train(10 + k, node, tag=replica_tag("llm", k)) for k, node in enumerate(("s1", "s2"))]
    plain = P  # no limits: a third shared node may go to inference
    assert not share_capped(replicas, shared, infer, training, plain)
    rules = P.rebalance.model_copy(update={"max_inference_nodes": 3})
    capped = P.model_copy(update={"rebalance": rules})  # i1 + s1 + s2 = 3 already: no fourth
    assert share_capped(replicas, shared, infer, training, capped)
    assert not share_capped(replicas[:1], shared, infer, training, capped)
    keep = P.model_copy(update={"rebalance": P.rebalance.model_copy(update={"min_training_nodes": 3})})
    assert share_capped(replicas, shared, infer, training, keep)  # t1, t2, s3 left: taking s3 leaves 2
    assert not share_capped(replicas[:1], shared, infer, training, keep)


def test_bobs_marker_for_alices_job_is_ignored(short_root: Path) -> None:
    """As bob (runuser), in a shared 1777 folder: a marker named after alice's job, to get her job evicted
    first. It does not count; alice's own does."""
    shared = short_root / "ckpt"
    shared.mkdir()
    shared.chmod(0o1777)
    done = subprocess.run(["runuser", "-u", "bob", "--", "touch", str(shared / "4242")], capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert checkpoint_times(shared, [("4242", "alice")]) == {}
    (shared / "4242").unlink()
    mine = subprocess.run(["runuser", "-u", "alice", "--", "touch", str(shared / "4242")], check=False)
    assert mine.returncode == 0
    assert list(checkpoint_times(shared, [("4242", "alice")])) == ["4242"]
