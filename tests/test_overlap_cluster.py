"""lending: overlap on the real cluster: a forecast burst, a replica pre-warmed one horizon ahead on the GPUs
hpcserve's gentle victim freed through Slurm's own preemption, and no request of the burst waiting past the
SLO.

The cluster is switched to its overlap layout for this module (``minicluster.sh lending overlap``:
train=node[1-6], infer=node[3-8] one PriorityTier above, REQUEUE after GraceTime=10 s) and back to moves
at the end; it runs with the disruptive tests, after every test that expects the moves layout.

The scene, all real: carol holds node2 (training) and node8 (inference) with sleep jobs; four training jobs
of alice and bob run on the shared node[3-6], each as hpcserve's templates make one (the batch shell traps
USR2, saves its step, touches ``$HPCSERVE_CHECKPOINT_DIR/<job id>`` and requeues itself):
- ``fresh`` (alice) checkpoints every 3 s: the gentlest victim;
- ``ending`` (bob) checkpoints every second but ends within the spare window: never to be chosen;
- ``stale_a``/``stale_b`` never checkpoint: everything since their start would be lost.
The history database holds two days of alice's deployment's load as the service's engine samples record it:
2 requests in the system, 14 during one minute every day. That minute comes again at ``burst_at``; the
policy's pre-warm profile has one-minute slots. ``hpcserve service`` (as root) runs the controller every
0.5 s; alice serves ``burst-llm`` (engine simulator, 4 GPUs a replica, 8 requests at once, 10 ms a token)
with one replica at least and two at most, and sends the burst through ``hpcserve gateway`` with her key:
14 streams of 1,500 tokens at once. One replica would make 6 of them wait 15 s; two run them all at once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from hpcserve.slurm.cli_backend import CliSlurmClient
from hpcserve.slurm.models import Job
from hpcserve.store import EngineSample, Replica
from tests.api_fixtures import ApiService, free_port
from tests.conftest import POLICY, REPO, wait_until
from tests.service_fixtures import terminate
from tests.test_replicas_as_owner import call_as

pytestmark = [pytest.mark.cluster, pytest.mark.disruptive]

GRACE_S = 10
SLO_S = 10.0  # a request waits at most this long for its first token (the simulator's SLO)
HORIZON_S = GRACE_S + 60 + 0.5  # grace + the policy's start estimate + one controller tick
NAME = "burst-llm"
BURST_STREAMS = 14
QUIET_LOAD, BURST_LOAD = 2.0, 14.0
SCRIPT = r"""#!/bin/bash
# args: STATE EVERY (checkpoint every EVERY steps; 0: never). A step is a second of "work".
STATE=$1 EVERY=$2
step=$(cat "$STATE" 2>/dev/null || echo 0)
[ "$step" -gt 0 ] && echo "resumed from step $step on $(hostname)"
echo "started on $(hostname)"
MARK=${HPCSERVE_CHECKPOINT_DIR:+$HPCSERVE_CHECKPOINT_DIR/$SLURM_JOB_ID}
save() { echo "$step" >"$STATE"; [ -z "$MARK" ] || touch "$MARK"; }
on_usr2() { save; echo "USR2: checkpoint at step $step"; scontrol requeue "$SLURM_JOB_ID"; exit 0; }
on_term() { save; echo "TERM: checkpoint at step $step"; exit 0; }
trap on_usr2 USR2
trap on_term TERM
while true; do
  sleep 1 & wait $!
  step=$((step + 1))
  if [ "$EVERY" -gt 0 ] && [ $((step % EVERY)) -eq 0 ]; then save; fi
done
"""


def sh(*argv: str, user: str | None = None, env: dict[str, str] | None = None) -> str:
    full = ["runuser", "-u", user, "--", *argv] if user else list(argv)
    done = subprocess.run(full, capture_output=True, text=True, timeout=60, check=False, env=env, cwd="/")
    assert done.returncode == 0, f"{' '.join(full)}: {done.stderr}"
    return done.stdout.strip()


@dataclass
class Scene:
    root: Path
    service: ApiService
    slurm: CliSlurmClient
    training: dict[str, str]  # role -> job id
    node_of: dict[str, str]  # role -> the node it ran on first
    burst_at: datetime
    gateway: str = ""
    key: str = ""

    def log(self, role: str) -> str:
        path = self.root / "jobs" / f"{self.training[role]}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def replicas(self) -> dict[int, Replica]:
        with self.service.store() as store:
            return {r.index: r for r in store.replicas(NAME)}

    def job(self, job_id: str) -> Job | None:
        return next((j for j in self.slurm.jobs() if j.id == job_id), None)


@pytest.fixture(scope="module")
def overlap_layout(slurm_env: dict[str, str]) -> Iterator[CliSlurmClient]:
    slurm = CliSlurmClient(timeout=30)
    try:
        wait_until(lambda: not slurm.jobs(), timeout=90, interval=1)
    except AssertionError:
        pytest.fail(f"the cluster is busy: {[(j.id, j.user, j.name) for j in slurm.jobs()]}")
    script = str(REPO / "scripts" / "minicluster.sh")
    sh("bash", script, "lending", "overlap", env={**slurm_env, "GRACE_TIME": str(GRACE_S)})
    try:
        yield slurm
    finally:
        mine = [j.id for j in slurm.jobs() if j.user in ("alice", "bob", "carol")]
        if mine:
            subprocess.run(["scancel", *mine], capture_output=True, check=False, timeout=60)
        wait_until(lambda: not slurm.jobs(), timeout=60, interval=1)
        sh("bash", script, "lending", "moves", env=slurm_env)


def _policy(root: Path) -> Path:
    data = yaml.safe_load(POLICY.read_text())
    data["classes"]["training"]["grace_s"] = GRACE_S
    # the 4-GPU jobs here are training's alone (interactive, also on train, is not preemptible)
    data["classes"]["interactive"] |= {"max_gpus_per_job": 2, "max_gpus_per_user": 2}
    data["prewarm"] = {"profile_slot_s": 60, "start_estimate_s": 60}
    path = root / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _site(service: ApiService, root: Path) -> None:
    """site_configs/minicluster-overlap.yaml with this test's service, grace, markers and replicas."""
    data = yaml.safe_load((REPO / "site_configs" / "minicluster-overlap.yaml").read_text())
    mine = yaml.safe_load(service.site.read_text())
    data |= {"service": mine["service"], "admins": mine["admins"], "database": mine["database"]}
    data["lending"] |= {"grace_time_s": GRACE_S, "checkpoint_dir": str(root / "ckpt")}
    data["serving"] |= {"replica_dir": str(root / "replicas"), "controller_interval_s": 0.5,
                        "ready_timeout_s": 60}  # fmt: skip
    service.site.write_text(yaml.safe_dump(data))


def _submit(root: Path, user: str, role: str, every: int, minutes: int, slurm_env: dict[str, str]) -> str:
    script = root / "train.sh"
    args = ["sbatch", "--parsable", "-p", "train", "--gres=gpu:4", "-N", "1", f"-t{minutes}", "--requeue",
            f"-J{role}", f"-o{root / 'jobs' / '%j.out'}", "--open-mode=append",
            f"--export=ALL,HPCSERVE_CHECKPOINT_DIR={root / 'ckpt'}",
            str(script), str(root / "jobs" / f"{role}.state"), str(every)]  # fmt: skip
    return sh(*args, user=user, env=slurm_env).split(";")[0]


def _hold(user: str, partition: str, node: str, slurm_env: dict[str, str]) -> str:
    argv = ["sbatch", "--parsable", "-p", partition, "-w", node, "--gres=gpu:4", "-t10", "-J", "hold",
            "-o/dev/null", "--wrap", "sleep 900"]  # fmt: skip
    return sh(*argv, user=user, env=slurm_env).split(";")[0]


def _seed(service: ApiService, burst_at: datetime) -> None:
    """Two days of the deployment's load, as the controller samples it: one busy minute a day."""
    now = datetime.now(UTC)
    rows, at = [], now - timedelta(days=2)
    while at < now - timedelta(seconds=5):
        busy = (at.hour, at.minute) == (burst_at.hour, burst_at.minute)
        rows.append(EngineSample(at, NAME, 0, waiting=0, running=int(BURST_LOAD if busy else QUIET_LOAD)))
        at += timedelta(seconds=60)
    with service.store() as store:
        store.add_engine_samples(rows)


@pytest.fixture(scope="module")
def scene(overlap_layout: CliSlurmClient, slurm_env: dict[str, str]) -> Iterator[Scene]:
    slurm = overlap_layout
    root = Path(tempfile.mkdtemp(prefix="hps-", dir="/tmp"))
    root.chmod(0o755)
    for folder in ("ckpt", "jobs"):
        (root / folder).mkdir(mode=0o1777)
        (root / folder).chmod(0o1777)
    (root / "train.sh").write_text(SCRIPT)
    (root / "train.sh").chmod(0o755)
    service = ApiService(root, slurm_env, f"sqlite:///{root / 'state' / 'hpcserve.db'}", _policy(root))
    _site(service, root)
    gateway: subprocess.Popen[bytes] | None = None
    try:
        placeholder = _hold("carol", "train", "node1", slurm_env)
        _hold("carol", "train", "node2", slurm_env)
        _hold("carol", "infer", "node8", slurm_env)
        roles = {"stale_a": ("alice", 0, 60), "stale_b": ("bob", 0, 60), "fresh": ("alice", 3, 60),
                 "ending": ("bob", 1, 4)}  # fmt: skip
        training = {role: _submit(root, user, role, every, minutes, slurm_env)
                    for role, (user, every, minutes) in roles.items()}  # fmt: skip
        wait_until(lambda: all((j := _job(slurm, i)) and j.nodes for i in training.values()), timeout=60)
        node_of = {role: _job(slurm, i).nodes[0] for role, i in training.items()}  # type: ignore[union-attr]
        assert sorted(node_of.values()) == ["node3", "node4", "node5", "node6"], node_of
        subprocess.run(["scancel", placeholder], check=True, timeout=30)  # where the victim may resume
        burst_at = (datetime.now(UTC) + timedelta(seconds=150)).replace(second=0, microsecond=0)
        burst_at += timedelta(minutes=1)
        service.start("--sample-interval", "0", "--rebalance-interval", "0")
        service.wait_ready()
        _seed(service, burst_at)
        spec = {"name": NAME, "model": "sim-model", "engine": "simulator", "gpus_per_replica": 4,
                "min_replicas": 1, "max_replicas": 2,
                "simulator": {"max_num_seqs": 8, "decode_ms_per_token": 10}}  # fmt: skip
        created = call_as(service, "alice", "POST", "/v1/deployments", {"values": spec})
        assert created.get("owner") == "alice", created
        scene = Scene(root, service, slurm, training, node_of, burst_at)
        wait_until(lambda: scene.replicas().get(0) is not None and scene.replicas()[0].state == "ready",
                   timeout=90, interval=0.5)  # fmt: skip
        made = service.run_as("alice", "keys", "create", "--name", "burst", "--json")
        assert made.returncode == 0, made.stderr
        scene.key = json.loads(made.stdout)["key"]
        port = free_port()
        argv = [sys.executable, "-m", "hpcserve", "gateway", "--host", "127.0.0.1", "--port", str(port),
                "--metrics-listen", "off"]  # fmt: skip
        with (root / "gateway.log").open("wb") as out:
            gateway = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=service.env)
        scene.gateway = f"http://127.0.0.1:{port}"
        wait_until(lambda: _models(scene) == [NAME], timeout=60, interval=0.5)
        yield scene
    finally:
        if gateway is not None:
            terminate([gateway])
        service.stop()
        shutil.rmtree(root, ignore_errors=True)


def _job(slurm: CliSlurmClient, job_id: str) -> Job | None:
    return next((j for j in slurm.jobs() if j.id == job_id), None)


def _models(scene: Scene) -> list[str]:
    try:
        answer = httpx.get(scene.gateway + "/v1/models", headers={"Authorization": f"Bearer {scene.key}"},
                           timeout=5)  # fmt: skip
    except httpx.TransportError:
        return []
    return [m["id"] for m in answer.json().get("data", [])] if answer.status_code == 200 else []


def _first_token_s(scene: Scene, index: int) -> float:
    """Seconds from sending one streamed chat request to its first token (the stream is read to its end)."""
    body = {"model": NAME, "stream": True, "max_tokens": 1500,
            "messages": [{"role": "user", "content": f"burst {index}"}]}  # fmt: skip
    headers = {"Authorization": f"Bearer {scene.key}"}
    start, first = time.monotonic(), None
    with httpx.stream("POST", scene.gateway + "/v1/chat/completions", json=body, headers=headers,
                      timeout=120) as answer:  # fmt: skip
        assert answer.status_code == 200, answer.read()
        for line in answer.iter_lines():
            if first is None and line.startswith("data:") and '"content"' in line:
                first = time.monotonic() - start
    assert first is not None, "no token came"
    return first


@dataclass
class Burst:
    waits: list[float]
    replicas_at_burst: dict[int, Replica]


@pytest.fixture(scope="module")
def burst(scene: Scene) -> Burst:
    """Wait for the burst's minute and send it: 14 streams at once, each timed to its first token."""
    time.sleep(max((scene.burst_at - datetime.now(UTC)).total_seconds(), 0.0))
    at_burst = scene.replicas()
    with ThreadPoolExecutor(BURST_STREAMS) as pool:
        waits = list(pool.map(lambda i: _first_token_s(scene, i), range(BURST_STREAMS)))
    return Burst(waits, at_burst)


def test_the_forecast_burst_pre_warms_a_replica_ahead_of_it(scene: Scene, burst: Burst) -> None:
    second = burst.replicas_at_burst.get(1)
    assert second is not None and second.state == "ready", burst.replicas_at_burst
    assert second.started_at is not None and second.ready_at is not None
    assert second.ready_at < scene.burst_at  # ready before the burst's first request
    ahead = (scene.burst_at - second.started_at).total_seconds()
    assert HORIZON_S - 5 <= ahead <= HORIZON_S + 5, ahead  # launched one horizon ahead, not just in case


def test_the_replica_runs_on_the_gpus_its_gentle_victim_freed(scene: Scene, burst: Burst) -> None:
    second = burst.replicas_at_burst[1]
    with scene.service.store() as store:
        lost = store.lost_work()
    assert [(r.job_id, r.user, r.node, r.replica_job_id) for r in lost] == [
        (scene.training["fresh"], "alice", scene.node_of["fresh"], second.job_id)
    ], scene.service.log()[-6000:]
    assert lost[0].lost_gpu_h < 4 * 10 / 3600  # at most the few seconds since its last save, on 4 GPUs
    replica = scene.job(str(second.job_id))
    assert replica is not None and replica.nodes == (scene.node_of["fresh"],), replica


def test_the_victim_checkpoints_on_usr2_requeues_and_resumes_from_it(scene: Scene, burst: Burst) -> None:
    wait_until(lambda: "resumed from step" in scene.log("fresh"), timeout=120, interval=1)
    log = scene.log("fresh")
    assert "USR2: checkpoint at step " in log, (log, scene.service.log()[-3000:])
    saved = int(log.split("USR2: checkpoint at step ")[1].split()[0])
    assert f"resumed from step {saved} on node1" in log, log
    fresh = scene.job(scene.training["fresh"])
    assert fresh is not None and fresh.nodes == ("node1",), fresh


def test_a_job_ending_within_the_spare_window_is_never_chosen(scene: Scene, burst: Burst) -> None:
    assert "USR2" not in scene.log("ending") and "TERM" not in scene.log("ending"), scene.log("ending")
    for role in ("stale_a", "stale_b", "ending"):  # only the chosen victim left its node
        job = scene.job(scene.training[role])
        assert job is not None and job.nodes == (scene.node_of[role],), (role, job)
    assert (scene.root / "ckpt" / scene.training["ending"]).is_file()  # it did checkpoint, and recently


def test_no_request_of_the_burst_waits_past_the_slo(burst: Burst) -> None:
    assert len(burst.waits) == BURST_STREAMS
    assert max(burst.waits) <= SLO_S, sorted(burst.waits)


def test_history_shows_each_victims_lost_gpu_hours_to_any_user(scene: Scene, burst: Burst) -> None:
    done = scene.service.run_as("bob", "history", "--lost", "--since", "1h", "--json")
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    [row] = answer["evictions"]
    assert (row["job_id"], row["user"], row["deployment"]) == (scene.training["fresh"], "alice", NAME)
    table = scene.service.run_as("bob", "history", "--lost", "--since", "1h")
    assert "1 evictions" in table.stdout and scene.training["fresh"] in table.stdout, table.stdout
