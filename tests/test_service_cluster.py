"""The rebalancer inside ``hpcserve service`` on the real cluster, with the planner deciding from the live
queue (the policy's rules made eager: ``EAGER_RULES``):
- a training backlog while the inference side idles: the service lends inference's pool nodes (node5,
  node6) to training, and the waiting job starts on them;
- an inference burst (more replica-sized jobs than inference's fixed nodes hold) takes a node back: it is
  drained, the preemptible training job on it gets USR2, checkpoints and is requeued, then the node moves;
- the service killed with SIGKILL at each executor step, then started again: the new process takes the
  dead one's lease at once, finishes the plan, and no node is left drained;
- ``scontrol reconfigure`` (slurm.conf's split again) under the service: its next round re-asserts the
  split, without a new plan.

Each test restores the split (train=node[1-4], infer=node[5-8]) afterwards.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcserve.hostlists import expand
from hpcserve.slurm.cli_backend import CliSlurmClient
from tests.conftest import wait_until
from tests.service_fixtures import EAGER_RULES, Service, policy_file
from tests.test_rebalance_cluster import (
    SPLIT,
    drained_by_hpcserve,
    job_field,
    members,
    node_state,
    ready,
    restore_split,
    sbatch,
)

pytestmark = pytest.mark.cluster
EVERY = ("--sample-interval", "1", "--rebalance-interval", "2")
SLEEP = "#!/bin/sh\nsleep 600\n"
# A preemptible training job as hpcserve's templates make one: the batch shell traps USR2 (what the
# executor sends, --signal=B:USR2 in Slurm's own words), saves a checkpoint, and requeues itself.
CHECKPOINTING = """#!/bin/bash
step=$(cat "$CKPT" 2>/dev/null || echo 0)
echo "start at step $step"
save() {
  echo "$step" >"$CKPT"; echo "USR2: checkpoint at step $step"
  scontrol requeue "$SLURM_JOB_ID"; exit 0
}
trap save USR2
while :; do step=$((step + 1)); sleep 0.2; done
"""
TRAINING_TAG = "--comment=hpcserve:training:ckpt-demo"


@pytest.fixture
def service(tmp_path: Path, slurm: CliSlurmClient, slurm_env: dict[str, str]) -> Iterator[Service]:
    """A service with eager rules, its own SQLite database and API socket (a short path: tmp_path may be
    too long for one); afterwards it is stopped and the split restored."""
    assert all(members(p) == expand(n) for p, n in SPLIT.items()), "the cluster does not start split as usual"
    svc = Service(tmp_path, slurm_env, f"sqlite:///{tmp_path}/h.db", policy_file(tmp_path, EAGER_RULES, 60))
    sockets = Path(tempfile.mkdtemp(prefix="hps-", dir="/tmp"))
    svc.env["HPCSERVE_SOCKET"] = str(sockets / "api.sock")  # `rebalance --plans` asks this service
    try:
        yield svc
    finally:
        svc.stop()
        restore_split()
        shutil.rmtree(sockets, ignore_errors=True)


def training_backlog(slurm_env: dict[str, str], job_dir: Path, submitted: list[str], script: str) -> str:
    """train's four nodes all taken, and a two-node training job waiting for Resources: its id."""
    fill = ["-p", "train", "-N4", "--ntasks-per-node=1", "--gres=gpu:4", "--time=10", "-J", "fill"]
    blocker = sbatch(fill, SLEEP, slurm_env, job_dir, submitted)
    wait_until(lambda: job_field(blocker, "JobState") == "RUNNING", timeout=120, interval=0.5)
    want = ["-p", "train", "-N2", "--gres=gpu:4", "--time=10", "-J", "backlog", "--requeue",
            "--signal=B:USR2@60", TRAINING_TAG]  # fmt: skip
    waiting = sbatch(want, script, slurm_env, job_dir, submitted)
    wait_until(lambda: job_field(waiting, "Reason") == "Resources", timeout=30, interval=0.3)
    return waiting


def plan_states(service: Service) -> list[str]:
    with service.store() as store:
        return [p.state for p in store.plans()]


def on_training(*nodes: str) -> bool:
    train, infer = members("train"), members("infer")
    return all(n in train and n not in infer and ready(n) for n in nodes)


def test_service_lends_idle_inference_nodes_to_a_backlog_and_takes_one_back_for_a_burst(
    service: Service, slurm_env: dict[str, str], job_dir: Path, submitted: list[str]
) -> None:
    env = {**slurm_env, "CKPT": str(job_dir / "ckpt")}
    waiting = training_backlog(env, job_dir, submitted, CHECKPOINTING)
    proc = service.start(*EVERY)

    wait_until(lambda: job_field(waiting, "JobState") == "RUNNING", timeout=90, interval=0.5)
    assert expand(job_field(waiting, "NodeList")) == ("node5", "node6")
    assert on_training("node5", "node6") and members("infer") == ("node7", "node8")
    wait_until(lambda: plan_states(service) == ["done"], timeout=30, interval=0.5)  # its last step checks
    with service.store() as store:
        [lend] = store.plans()
        assert {m["node"] for m in lend.moves} == {"node5", "node6"}
        assert "training backlog 8 GPUs (2 node(s))" in lend.reason, lend.reason

    # the burst: three 4-GPU jobs on inference, whose fixed nodes (node7, node8) hold two
    burst = ["-p", "infer", "-N1", "--gres=gpu:4", "--time=10", "-J", "replica-sized"]
    jobs = [sbatch(burst, SLEEP, slurm_env, job_dir, submitted) for _ in range(3)]
    wait_until(lambda: all(job_field(j, "JobState") == "RUNNING" for j in jobs), timeout=120, interval=0.5)

    log = job_dir / f"backlog-{waiting}.out"
    assert "USR2: checkpoint at step" in log.read_text(), log.read_text()
    assert (job_dir / "ckpt").read_text().strip().isdigit()
    assert job_field(waiting, "Restarts") == "1" and job_field(waiting, "JobState") == "PENDING"
    taken = sorted(set(members("infer")) - {"node7", "node8"})
    assert len(taken) == 1 and taken[0] in ("node5", "node6") and ready(taken[0])
    wait_until(lambda: plan_states(service) == ["done", "done"], timeout=30, interval=0.5)
    with service.store() as store:
        plans = store.plans()
        steps = {s.kind: s for s in store.steps(plans[1].id)}
    assert steps["signal"].detail == f"signalled: {waiting} batch"
    assert steps["move"].started_at is not None and steps["signal"].started_at is not None
    assert proc.poll() is None and drained_by_hpcserve() == []


@pytest.mark.parametrize("point", ["drain", "signal", "wait", "move", "resume"])
def test_service_killed_at_each_step_restarts_and_converges(
    service: Service, slurm_env: dict[str, str], job_dir: Path, submitted: list[str], point: str
) -> None:
    waiting = training_backlog(slurm_env, job_dir, submitted, SLEEP)

    crashed = service.start(*EVERY, crash=point)
    assert crashed.wait(timeout=120) == -9, service.log()
    with service.store() as store:
        [plan] = store.plans()
        open_step = next(s for s in store.steps(plan.id) if s.state != "done")
    assert plan.state == "running" and open_step.kind == point and open_step.started_at is not None
    # phase by phase: both nodes are drained before any signal; a kill at "drain" comes before it acted
    assert drained_by_hpcserve() == ([] if point == "drain" else ["node5", "node6"])

    again = service.start(*EVERY)

    wait_until(lambda: on_training("node5", "node6"), timeout=60, interval=0.5)
    wait_until(lambda: job_field(waiting, "JobState") == "RUNNING", timeout=60, interval=0.5)
    wait_until(lambda: plan_states(service) == ["done"], timeout=30, interval=0.5)  # its last step checks
    with service.store() as store:
        assert all(s.state == "done" for s in store.steps(plan.id))
    assert drained_by_hpcserve() == [] and again.poll() is None
    argv = [sys.executable, "-m", "hpcserve", "rebalance", "--plans", "--json"]
    listed = subprocess.run(argv, capture_output=True, text=True, env=service.env, timeout=60, check=True)
    [row] = json.loads(listed.stdout)
    assert row["holder"] == f"{socket.gethostname()}:{again.pid}" and row["finished_at"] is not None, row
    log = service.log()
    assert "is gone (crashed?); taken over by" in log and f"resuming rebalance plan {plan.id}" in log, log
    assert all("DRAIN" not in node_state(n)[0] for n in ("node5", "node6"))


def test_service_reasserts_the_split_after_scontrol_reconfigure(
    service: Service, slurm_env: dict[str, str], job_dir: Path, submitted: list[str]
) -> None:
    waiting = training_backlog(slurm_env, job_dir, submitted, SLEEP)
    service.start(*EVERY)
    wait_until(lambda: job_field(waiting, "JobState") == "RUNNING", timeout=90, interval=0.5)
    wait_until(lambda: plan_states(service) == ["done"], timeout=30, interval=0.5)
    assert on_training("node5", "node6")

    subprocess.run(["scontrol", "reconfigure"], check=True, timeout=60)  # back to slurm.conf's split

    wait_until(lambda: on_training("node5", "node6") and members("infer") == ("node7", "node8"), timeout=60)
    assert plan_states(service) == ["done"]  # re-asserted, not planned again
    log = service.log()
    assert "partition train drifted from the desired split: setting Nodes=node[1-6]" in log, log
    assert "partition infer drifted from the desired split: setting Nodes=node[7-8]" in log, log
