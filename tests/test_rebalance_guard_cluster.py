"""The rebalance executor does not trust its own database, on the real cluster: plan rows written by hand
(store.create_plan, as anyone with write access to the database could) are carried out by
``hpcserve rebalance --apply`` (its round resumes unfinished plans first; its own ``--move`` is a no-op).

- a plan naming node1 (outside the managed pool node[3-6]) is refused: node1's state, reason and partitions
  stay as they were, and a preemptible job on it gets no signal;
- a plan moving a pool node whose row lists bob's non-preemptible job on another node as "preempt": the
  executor signals only what Slurm shows on the moving node (alice's preemptible job), never bob's.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hpcserve.rebalance.steps import PHASES
from hpcserve.rebalance.types import Side
from hpcserve.slurm.cli_backend import CliSlurmClient
from hpcserve.store.records import NewStep
from tests.conftest import wait_until
from tests.test_rebalance_cluster import Rebalance, job_field, members, node_state, rebalance

__all__ = ["rebalance"]  # the fixture, imported for use here
pytestmark = pytest.mark.cluster
TRAPS_USR2 = "#!/bin/bash\ntrap 'echo usr2 > $SLURM_JOB_ID.usr2; exit 0' USR2\nsleep 300 &\nwait\n"


def sbatch_as(user: str, job_dir: Path, submitted: list[str], *args: str) -> str:
    argv = ["runuser", "-u", user, "--", "sbatch", "--parsable", "--time=5", f"--chdir={job_dir}",
            f"--output={job_dir}/%j.out", *args]  # fmt: skip
    out = subprocess.run(argv, input=TRAPS_USR2, capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    submitted.append(out.stdout.strip().split(";")[0])
    return submitted[-1]


def running(job_id: str) -> bool:
    return job_field(job_id, "JobState") == "RUNNING"


def hand_written_plan(rebalance: Rebalance, node: str, src: Side, dst: Side, preempt: list[str]) -> int:
    move = {"node": node, "src": src.value, "dst": dst.value, "reason": "written by hand",
            "preempt": preempt, "grace_s": 5}  # fmt: skip
    steps = [NewStep(node=node, src=src.value, dst=dst.value, kind=kind) for kind in PHASES]
    with rebalance.store() as store:
        return store.create_plan("written by hand", [move], steps)


def apply_round(rebalance: Rebalance) -> str:
    """One ``rebalance --apply`` round; node6 is already on inference, so only the stored plan acts."""
    out = rebalance.apply("--move", "node6=inference")
    assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr


def test_a_plan_naming_an_unmanaged_node_is_refused_and_the_node_untouched(
    rebalance: Rebalance, job_dir: Path, submitted: list[str]
) -> None:
    job = sbatch_as(
        "alice", job_dir, submitted, "-p", "train", "-w", "node1", "--comment=hpcserve:training:g"
    )
    wait_until(lambda: running(job), timeout=60)
    before = (node_state("node1"), members("train"), members("infer"), members("all"))
    plan_id = hand_written_plan(rebalance, "node1", Side.TRAINING, Side.INFERENCE, [job])

    apply_round(rebalance)

    with rebalance.store() as store:
        assert store.plan(plan_id).state == "failed"  # type: ignore[union-attr]
        first = store.steps(plan_id)[0]
    assert first.kind == "drain" and "node1 is not in the site's managed pool" in first.detail
    assert (node_state("node1"), members("train"), members("infer"), members("all")) == before
    assert running(job) and job_field(job, "Restarts") == "0" and not (job_dir / f"{job}.usr2").exists()


def free_pool_node(slurm: CliSlurmClient) -> str:
    """A training pool node no job holds now (other tests share the cluster)."""
    found: list[str] = []

    def idle() -> bool:
        busy = {n for j in slurm.jobs() if not j.state.is_pending for n in j.nodes}
        found[:] = [n for n in ("node4", "node3") if n not in busy]
        return bool(found)

    wait_until(idle, timeout=120, interval=1.0)
    return found[0]


def test_the_jobs_to_preempt_come_from_slurm_not_from_the_stored_plan(
    rebalance: Rebalance, slurm: CliSlurmClient, job_dir: Path, submitted: list[str]
) -> None:
    node = free_pool_node(slurm)
    bobs = sbatch_as("bob", job_dir, submitted, "-p", "infer", "-w", "node7", "-J", "bob-not-preemptible")
    alices = sbatch_as(
        "alice", job_dir, submitted, "-p", "train", "-w", node, "--comment=hpcserve:training:a"
    )
    wait_until(lambda: running(bobs) and running(alices), timeout=60)
    plan_id = hand_written_plan(rebalance, node, Side.TRAINING, Side.INFERENCE, [bobs, f"{bobs}_0"])

    apply_round(rebalance)

    with rebalance.store() as store:
        assert store.plan(plan_id).state == "done"  # type: ignore[union-attr]
        signal = next(s for s in store.steps(plan_id) if s.kind == "signal")
    assert signal.detail == f"signalled: {alices} batch"
    wait_until(lambda: (job_dir / f"{alices}.usr2").exists(), timeout=30)  # alice's job trapped USR2
    assert running(bobs) and job_field(bobs, "Restarts") == "0" and not (job_dir / f"{bobs}.usr2").exists()
    assert node in members("infer") and node not in members("train")
