"""Rebalancing on the real cluster: ``hpcserve rebalance --apply`` (a subprocess, as cron runs it) moves node5
(managed pool) between train and infer; a preemptible job checkpoints on USR2 and is requeued before the
node moves; a run killed with SIGKILL after any step resumes and converges; ``scontrol reconfigure`` is
undone by the next round; two runs at once act once; the sampler rides out an unreachable slurmctld.

Each test restores the split (train=node[1-4], infer=node[5-8]) and resumes the pool nodes afterwards.
Every run uses ``--move`` (a hand-made plan), never the planner: other tests' jobs share this cluster.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx
import pytest

from hpcserve.config import load_policy, load_site_config
from hpcserve.hostlists import expand
from hpcserve.rebalance.control import Rebalancer
from hpcserve.rebalance.executor import CRASH_ENV
from hpcserve.rebalance.sampler import Sampler
from hpcserve.slurm.cli_backend import CliSlurmClient
from hpcserve.slurm.runner import CommandResult, SubprocessRunner
from hpcserve.store import HistoryStore
from tests.conftest import POLICY, REPO, SITE, wait_until
from tests.test_serving_cluster import free_port

pytestmark = pytest.mark.cluster
POOL = ("node3", "node4", "node5", "node6")
SPLIT = {"train": "node[1-4]", "infer": "node[5-8]"}
TEMPLATE = REPO / "jobtemplates" / "train-torchrun.sbatch"
VENV_BIN = Path(sys.executable).parent
TORCH_START_S = 180.0  # importing torch on a small machine, queued behind other tests' jobs


# ----------------------------------------------------------------------------------------------- helpers
def scontrol(*args: str) -> str:
    out = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30, check=False)
    return out.stdout


def members(partition: str) -> tuple[str, ...]:
    match = re.search(r"\bNodes=(\S+)", scontrol("show", "partition", "-o", partition))
    return expand(match[1]) if match else ()


def node_state(node: str) -> tuple[str, str]:
    """(State=..., Reason=...) as scontrol shows them, e.g. ("IDLE+DRAIN", "hpcserve: moving ...")."""
    line = scontrol("show", "node", "-o", node)
    state = re.search(r"\bState=(\S+)", line)
    reason = re.search(r"\bReason=(.*?)( \[|$)", line)
    return (state[1] if state else "", reason[1].strip() if reason else "")


def ready(node: str) -> bool:
    state = node_state(node)[0]
    return state.split("+")[0] in ("IDLE", "MIXED", "ALLOCATED") and "DRAIN" not in state and "*" not in state


def restore_split() -> None:
    for partition, nodes in SPLIT.items():
        subprocess.run(["scontrol", "update", f"PartitionName={partition}", f"Nodes={nodes}"], check=True)
    for node in POOL:
        state, reason = node_state(node)
        if "DRAIN" in state and reason.startswith("hpcserve:"):
            subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], check=False)
    wait_until(lambda: all(ready(n) for n in POOL), timeout=30, interval=0.3)


def sbatch(args: Sequence[str], script: str, env: Mapping[str, str], cwd: Path, submitted: list[str]) -> str:
    argv = ["sbatch", "--parsable", f"--output={cwd}/%x-%j.out", *args]
    out = subprocess.run(argv, input=script, capture_output=True, text=True, env=dict(env), cwd=cwd,
                         timeout=30, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    submitted.append(job_id)
    return job_id


def job_field(job_id: str, name: str) -> str:
    match = re.search(rf"\b{name}=(\S*)", scontrol("show", "job", "-o", job_id))
    return match[1] if match else ""


class Rebalance:
    """``hpcserve rebalance`` in a subprocess, with this test's own database (migrated first, as an admin
    does with ``hpcserve db upgrade``; it holds the planner state too)."""

    def __init__(self, root: Path, slurm_env: Mapping[str, str]) -> None:
        self.db = root / "hpcserve.db"
        self.env = {**slurm_env, "HPCSERVE_SITE": str(SITE), "HPCSERVE_POLICY": str(POLICY),
                    "HPCSERVE_DATABASE_URL": f"sqlite:///{self.db}"}  # fmt: skip
        self.env.pop(CRASH_ENV, None)
        with self.store() as store:
            store.upgrade()

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "hpcserve", "rebalance", "--apply", *args]

    def apply(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=300,
                              env={**self.env, **(env or {})}, check=False)  # fmt: skip

    def store(self) -> HistoryStore:
        return HistoryStore(f"sqlite:///{self.db}")


@pytest.fixture
def rebalance(tmp_path: Path, slurm: CliSlurmClient, slurm_env: dict[str, str]) -> Iterator[Rebalance]:
    """A rebalance runner; afterwards (pass or fail) the split is restored and the pool nodes resumed."""
    assert all(members(p) == expand(n) for p, n in SPLIT.items()), "the cluster does not start split as usual"
    try:
        yield Rebalance(tmp_path, slurm_env)
    finally:
        restore_split()


def step_rows(store: HistoryStore, plan_id: int) -> list[tuple[str, str, str]]:
    return [(s.kind, s.node, s.state) for s in store.steps(plan_id)]


def drained_by_hpcserve() -> list[str]:
    return [n for n in POOL if "DRAIN" in node_state(n)[0] and node_state(n)[1].startswith("hpcserve:")]


# ----------------------------------------------------------------------------------------------- tests
def test_apply_moves_node5_to_training_and_a_pending_training_job_starts(
    rebalance: Rebalance, slurm_env: dict[str, str], job_dir: Path, submitted: list[str]
) -> None:
    # train's GPUs all taken, so a 4-GPU training job waits for Resources until node5 joins
    fill = ["-p", "train", "-N4", "--ntasks-per-node=1", "--gres=gpu:4", "--time=5", "-J", "fill"]
    blocker = sbatch(fill, "#!/bin/sh\nsleep 300\n", slurm_env, job_dir, submitted)
    wait_until(lambda: job_field(blocker, "JobState") == "RUNNING", timeout=120, interval=0.5)
    want = ["-p", "train", "-N1", "--gres=gpu:4", "--time=5", "-J", "waits-for-node5"]
    waiting = sbatch(want, "#!/bin/sh\nsleep 300\n", slurm_env, job_dir, submitted)
    wait_until(lambda: job_field(waiting, "Reason") == "Resources", timeout=20, interval=0.3)

    done = rebalance.apply("--move", "node5=training")

    assert done.returncode == 0 and "plan 1: done (node5 inference->training)" in done.stdout, done.stderr
    assert "node5" in members("train") and "node5" not in members("infer") and "node5" in members("all")
    wait_until(lambda: job_field(waiting, "JobState") == "RUNNING", timeout=30, interval=0.3)
    assert job_field(waiting, "NodeList") == "node5"
    assert "DRAIN" not in node_state("node5")[0]
    with rebalance.store() as store:
        plan = store.plans()[0]
        assert plan.state == "done" and plan.moves[0]["node"] == "node5"
        kinds = ["drain", "signal", "wait", "move", "resume"]
        assert step_rows(store, plan.id) == [(k, "node5", "done") for k in kinds]


def test_move_back_checkpoints_and_requeues_the_preemptible_job_before_the_node_moves(
    rebalance: Rebalance, slurm_env: dict[str, str], job_dir: Path, submitted: list[str]
) -> None:
    assert rebalance.apply("--move", "node5=training").returncode == 0
    env = {**slurm_env, "PATH": f"{VENV_BIN}:{slurm_env.get('PATH', '/usr/bin:/bin')}", "STEPS": "600",
           "STEP_SECONDS": "0.2", "CKPT_DIR": str(job_dir / "ckpt")}  # fmt: skip
    args = ["-p", "train", "-w", "node5", "--nodes=1", "--time=10", "--requeue", "--signal=B:USR2@60",
            "--comment=hpcserve:training:ckpt-demo", str(TEMPLATE)]  # fmt: skip
    job = sbatch(args, "", env, job_dir, submitted)
    log = job_dir / f"train-torchrun-{job}.out"
    wait_until(lambda: log.exists() and "rank=0 step=2 " in log.read_text(), timeout=TORCH_START_S)

    back = rebalance.apply("--move", "node5=inference", "--grace-s", "90")

    assert back.returncode == 0 and "plan 2: done (node5 training->inference)" in back.stdout, back.stderr
    out = log.read_text()
    assert "USR2 received" in out and "rank=0 got USR2" in out and "checkpoint saved at step" in out, out
    checkpoint = job_dir / "ckpt" / "demo.pt"
    assert checkpoint.exists()
    assert job_field(job, "Restarts") == "1" and job_field(job, "JobState") in ("PENDING", "REQUEUED")
    assert "node5" in members("infer") and "node5" not in members("train")
    with rebalance.store() as store:
        steps = {s.kind: s for s in store.steps(2)}
    assert steps["signal"].detail == f"signalled: {job} batch"
    assert steps["wait"].detail.startswith("free "), steps["wait"].detail  # left on its own, in the grace
    moved_at = steps["move"].started_at
    assert moved_at is not None and checkpoint.stat().st_mtime <= moved_at.timestamp()


@pytest.mark.parametrize(
    "point", ["drain", "signal", "wait", "move", "resume", "drain:acted", "move:acted", "resume:acted"]
)
def test_a_killed_run_resumes_its_plan_and_converges(rebalance: Rebalance, point: str) -> None:
    crashed = rebalance.apply("--move", "node5=training", "--lock-ttl", "2", env={CRASH_ENV: point})

    assert crashed.returncode == -9, crashed.stderr
    kind = point.partition(":")[0]
    with rebalance.store() as store:
        assert store.plans()[0].state == "running"
        open_step = next(s for s in store.steps(1) if s.state != "done")
        assert open_step.kind == kind and open_step.started_at is not None and open_step.state == "todo"
    drained = point not in ("drain", "resume:acted")  # drained after the drain acted, until the resume did
    assert drained_by_hpcserve() == (["node5"] if drained else [])
    time.sleep(2.2)  # the killed run's lease expires

    again = rebalance.apply("--move", "node5=training", "--lock-ttl", "2")

    assert again.returncode == 0 and "finished plans a previous run left: 1" in again.stdout, again.stderr
    assert "node5 is already on the training side" in again.stdout
    with rebalance.store() as store:
        assert [p.state for p in store.plans()] == ["done"]
        assert all(state == "done" for _, _, state in step_rows(store, 1))
    assert "node5" in members("train") and "node5" not in members("infer") and ready("node5")
    assert drained_by_hpcserve() == []


def test_a_node_left_drained_without_an_unfinished_plan_is_resumed(rebalance: Rebalance) -> None:
    crashed = rebalance.apply("--move", "node5=training", "--lock-ttl", "2", env={CRASH_ENV: "drain:acted"})
    assert crashed.returncode == -9 and drained_by_hpcserve() == ["node5"]
    with rebalance.store() as store:
        store.set_plan_state(1, "aborted")  # an operator gave the plan up
    time.sleep(2.2)  # the killed run's lease expires

    repaired = rebalance.apply("--move", "node5=inference")

    assert repaired.returncode == 0, repaired.stderr
    assert "resumed nodes left drained by hpcserve: node5" in repaired.stdout
    wait_until(lambda: ready("node5"), timeout=15)
    assert "node5" in members("infer")


def test_reconfigure_resets_partitions_and_the_next_round_reasserts_the_split(
    rebalance: Rebalance, slurm: CliSlurmClient
) -> None:
    assert rebalance.apply("--move", "node5=training").returncode == 0
    assert "node5" in members("train")

    subprocess.run(["scontrol", "reconfigure"], check=True, timeout=60)
    wait_until(lambda: members("train") == expand(SPLIT["train"]), timeout=30)

    site = load_site_config(SITE)
    with rebalance.store() as store:
        report = Rebalancer(slurm, store, site, load_policy(POLICY)).round()
    assert report.reasserted == {"train": ("node1", "node2", "node3", "node4", "node5"),
                                 "infer": ("node6", "node7", "node8")}  # fmt: skip
    assert "node5" in members("train") and "node5" not in members("infer")
    with rebalance.store() as store:
        assert Rebalancer(slurm, store, site, load_policy(POLICY)).round().reasserted == {}


def test_two_applies_at_once_act_once(
    rebalance: Rebalance, slurm_env: dict[str, str], job_dir: Path, submitted: list[str]
) -> None:
    # a job on node5 keeps the winner busy for its grace period while the other run starts
    hold = ["-p", "infer", "-w", "node5", "--time=5", "-J", "holds-node5"]
    sbatch(hold, "#!/bin/sh\nsleep 300\n", slurm_env, job_dir, submitted)
    wait_until(lambda: node_state("node5")[0].startswith(("MIXED", "ALLOCATED")), timeout=30)
    argv = rebalance.argv("--move", "node5=training", "--grace-s", "4")
    pipe = subprocess.PIPE
    runs = [subprocess.Popen(argv, stdout=pipe, stderr=pipe, text=True, env=rebalance.env) for _ in range(2)]
    outs = [run.communicate(timeout=300) for run in runs]

    assert [run.returncode for run in runs] == [0, 0], outs
    stdouts = sorted(out for out, _ in outs)
    assert "holds the lock 'rebalance': nothing done" in stdouts[0], stdouts
    assert "plan 1: done (node5 inference->training)" in stdouts[1], stdouts
    with rebalance.store() as store:
        assert len(store.plans()) == 1 and "requeued" in store.steps(1)[2].detail


class Switchable:
    """The real runner, pointed at the real slurm.conf or (``down``) a copy whose controller port is closed:
    Slurm's own commands then fail just as they do while slurmctld is stopped."""

    def __init__(self, up: Mapping[str, str], down: Mapping[str, str]) -> None:
        self.up, self.down_runner = SubprocessRunner(up), SubprocessRunner(down)
        self.down = False

    def _pick(self) -> SubprocessRunner:
        return self.down_runner if self.down else self.up

    def __call__(self, argv: Sequence[str], *, timeout: float, stdin: str | None = None) -> CommandResult:
        return self._pick()(argv, timeout=timeout, stdin=stdin)

    def lines(
        self, argv: Sequence[str], *, timeout: float, env: Mapping[str, str | None] | None = None
    ) -> Iterator[str]:
        return self._pick().lines(argv, timeout=timeout, env=env)


def unreachable_conf(tmp_path: Path, conf: Path) -> Path:
    text = re.sub(r"(?m)^(SlurmctldPort|MessageTimeout|TCPTimeout)=.*$", "", conf.read_text())
    path = tmp_path / "unreachable" / "slurm.conf"
    path.parent.mkdir()
    path.write_text(text + "\nSlurmctldPort=6999\nMessageTimeout=1\nTCPTimeout=1\n")
    return path


def test_sampler_logs_the_gap_while_slurmctld_is_unreachable_and_resumes(
    tmp_path: Path, slurm_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    bad = unreachable_conf(tmp_path, Path(slurm_env["SLURM_CONF"]))
    runner = Switchable(slurm_env, {**slurm_env, "SLURM_CONF": str(bad)})
    caplog.set_level(logging.INFO, logger="hpcserve.sampler")
    with HistoryStore(f"sqlite:///{tmp_path}/h.db") as store:
        store.upgrade()
        sampler = Sampler(CliSlurmClient(runner, timeout=30), store)
        assert sampler.tick() == 3  # train, infer, all
        runner.down = True
        assert sampler.tick() is None and sampler.tick() is None and sampler.down_since is not None
        runner.down = False
        assert sampler.tick() == 3 and sampler.down_since is None
        rows = store.queue_samples()
    gap = [r.getMessage() for r in caplog.records if "slurmctld" in r.getMessage()]
    assert len(gap) == 2, gap  # the gap's start once, then its end
    assert (
        gap[0].startswith("slurmctld unreachable since ") and "Unable to contact slurm controller" in gap[0]
    )
    assert gap[1].startswith("slurmctld answers again: no queue samples from ")
    assert {r.partition for r in rows} == {"train", "infer", "all"} and len(rows) == 6
    assert {r.total_gpus for r in rows if r.partition == "all"} == {32}


def test_service_samples_the_queue_and_serves_metrics(tmp_path: Path, slurm_env: dict[str, str]) -> None:
    port = free_port()
    env = {**slurm_env, "HPCSERVE_SITE": str(SITE), "HPCSERVE_POLICY": str(POLICY),
           "HPCSERVE_DATABASE_URL": f"sqlite:///{tmp_path}/h.db"}  # fmt: skip
    argv = [sys.executable, "-m", "hpcserve", "service", "--sample-interval", "1",
            "--rebalance-interval", "0", "--metrics-port", str(port)]  # fmt: skip
    with (tmp_path / "service.log").open("w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        text = ""

        def sampled_twice() -> bool:
            nonlocal text
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except httpx.HTTPError:
                return False
            return re.search(r'hpcserve_service_ticks_total\{task="sampler"\} [2-9]', text) is not None

        wait_until(sampled_twice, timeout=60, interval=0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert re.search(r'^hpcserve_service_errors_total\{task="sampler"\} 0\.0$', text, re.MULTILINE), text
    stamp = re.search(r"^hpcserve_sampler_last_sample_timestamp_seconds (\S+)$", text, re.MULTILINE)
    assert stamp is not None and abs(float(stamp[1]) - time.time()) < 60
    with HistoryStore(f"sqlite:///{tmp_path}/h.db") as store:
        assert {s.partition for s in store.queue_samples()} == {"train", "infer", "all"}
