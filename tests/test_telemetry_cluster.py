"""GPU telemetry and idle flags on the real cluster, as real users, through a real service.

alice serves two deployments (one replica each, real Slurm jobs of hers). Each replica's GPU is a recorded
NVML device (tests/nvml_recorded: pynvml's real entry points over a replayed recording), sampled by the real
NvmlSampler and reported by the real Reporter with the replica's secret; one recording reads about 5%, the
other about 90%. With a 20 s idle window the 5% replica is flagged (in the service's log, `hpcserve idle`,
`hpcserve ps` and /metrics) and the 90% one is not. The boundaries are tried from the refused side: bob
posting for alice's job (on the socket, over munge, even with her replica's secret), bob reading
telemetry, bob asking for the idle list (exit 77), a caller with no identity.

(The reporter runs on the login node as alice, with the secret from her replica's 0600 file, not inside the
replica job: the site's serving.replica_env is one for all replicas, and these two read different recordings.
tests/test_telemetry_replica_cluster.py has a replica job report itself.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from hpcserve.serving.launcher import replica_folder
from hpcserve.serving.replica import ReplicaCredentials, secret_file_name
from hpcserve.slurm.cli_backend import CliSlurmClient
from hpcserve.store import Replica
from tests.api_fixtures import ApiService, free_port
from tests.conftest import POLICY, wait_until
from tests.nvml_fixtures import BUSY, IDLE, build_recorded_nvml, recorded_env

pytestmark = pytest.mark.cluster
SIM = {"model": "sim-model", "engine": "simulator", "gpus_per_replica": 1, "min_replicas": 1,
       "max_replicas": 1}  # fmt: skip
IDLE_RULES = {"gpu_util_below_pct": 20, "window_s": 20, "sample_gap_s": 10, "replica_no_requests_s": None}
REPORT_EVERY_S = 2


@dataclass
class Served:
    service: ApiService
    root: Path
    metrics_port: int
    replicas: dict[str, Replica]  # "idle" / "busy" -> alice's replica
    reporters: list[subprocess.Popen[bytes]]

    def job(self, which: str) -> str:
        job_id = self.replicas[which].job_id
        assert job_id is not None
        return job_id


def call(service: ApiService, user: str, method: str, path: str, body: Any = None,
         headers: dict[str, str] | None = None, tcp: bool = False) -> dict[str, Any]:  # fmt: skip
    """``ServiceClient.call`` from a process of ``user`` (on the socket, or over TCP with munge): the answer,
    or ``{"status": N, "error": line, "exit_code": c}`` when the service refuses."""
    code = (
        "import json, sys; from pathlib import Path\n"
        "from hpcserve.service.client import ServiceClient, ServiceError\n"
        "a = json.load(sys.stdin)\n"
        "c = ServiceClient(None, a['url']) if a['tcp'] else ServiceClient(Path(a['socket']))\n"
        "try: print(json.dumps(c.call(a['method'], a['path'], a['body'], a['headers'])))\n"
        "except ServiceError as e: print(json.dumps({'status': e.status, 'error': str(e), "
        "'exit_code': e.exit_code}))\n"
    )
    args = {"socket": str(service.socket), "url": f"http://127.0.0.1:{service.port}", "tcp": tcp,
            "method": method, "path": path, "body": body, "headers": headers}  # fmt: skip
    done = subprocess.run(["runuser", "-u", user, "--", sys.executable, "-c", code], input=json.dumps(args),
                          capture_output=True, text=True, env=service.user_env(), timeout=60, check=False,
                          cwd="/")  # fmt: skip
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


REPORTER = """\
import json, sys, time
from pathlib import Path
from hpcserve.service.client import ServiceClient
from hpcserve.serving.replica import ReplicaCredentials
from hpcserve.telemetry.batching import ReplicaIdentity
from hpcserve.telemetry.nvml import NvmlSampler
from hpcserve.telemetry.reporter import Reporter, client_post
a = json.load(sys.stdin)
secret = ReplicaCredentials.decode(Path(a["secret_file"]).read_bytes()).secret
identity = ReplicaIdentity(a["deployment"], a["index"], secret)
post = client_post(lambda: ServiceClient(Path(a["socket"])))
Reporter(a["job_id"], NvmlSampler(a["job_id"]), post, a["every"], identity).run()
"""


def start_reporter(served_root: Path, service: ApiService, replica: Replica, recording: Path,
                   library: Path) -> subprocess.Popen[bytes]:  # fmt: skip
    """T's real sampler and reporter as alice, on the recorded device, with her replica's own secret."""
    secret_file = replica_folder(served_root / "replicas", "alice", replica.deployment) / secret_file_name(
        replica.index
    )
    env = recorded_env(library, recording, service.user_env(), CUDA_VISIBLE_DEVICES="0")
    args = {"secret_file": str(secret_file), "deployment": replica.deployment, "index": replica.index,
            "socket": str(service.socket), "job_id": replica.job_id, "every": REPORT_EVERY_S}  # fmt: skip
    log = (served_root / f"reporter-{replica.deployment}.log").open("wb")
    proc = subprocess.Popen(["runuser", "-u", "alice", "--", sys.executable, "-c", REPORTER], env=env,
                            stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, cwd="/")  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(args).encode())
    proc.stdin.close()
    return proc


@pytest.fixture(scope="module")
def served(slurm_env: dict[str, str]) -> Iterator[Served]:
    """A service with a 20 s idle window and /metrics, alice's two deployments ready, and a reporter for
    each replica (5% and 90%)."""
    root = Path(tempfile.mkdtemp(prefix="hps-", dir="/tmp"))
    root.chmod(0o755)
    policy = yaml.safe_load(POLICY.read_text())
    policy["idle"] = IDLE_RULES
    (root / "policy.yaml").write_text(yaml.safe_dump(policy))
    service = ApiService(root, slurm_env, f"sqlite:///{root / 'state' / 'hpcserve.db'}", root / "policy.yaml")
    site = yaml.safe_load(service.site.read_text())
    site["serving"] |= {"replica_dir": str(root / "replicas"), "controller_interval_s": 0.5,
                        "ready_timeout_s": 120}  # fmt: skip
    service.site.write_text(yaml.safe_dump(site))
    library = build_recorded_nvml(root / "nvml")
    for path in (library, library / "libnvidia-ml.so.1"):
        path.chmod(0o755)
    port = free_port()
    service.start("--sample-interval", "0", "--rebalance-interval", "0", "--metrics-port", str(port))
    tag = uuid.uuid4().hex[:6]
    names = {"idle": f"idle-{tag}", "busy": f"busy-{tag}"}
    served = Served(service, root, port, {}, [])
    try:
        service.wait_ready()
        for name in names.values():
            created = call(service, "alice", "POST", "/v1/deployments", {"values": {"name": name, **SIM}})
            assert created.get("owner") == "alice", created

        def ready() -> dict[str, Replica]:
            with service.store() as store:
                rows = {r.deployment: r for r in store.replicas() if r.state == "ready"}
            return {which: rows[name] for which, name in names.items() if name in rows}

        wait_until(lambda: len(ready()) == 2, timeout=180, interval=0.5)
        served.replicas = ready()
        for which, recording in (("idle", IDLE), ("busy", BUSY)):
            served.reporters.append(start_reporter(root, service, served.replicas[which], recording, library))
        yield served
    finally:
        for proc in served.reporters:
            proc.terminate()
            proc.wait(timeout=30)
        service.stop()
        leftovers = [j.id for j in CliSlurmClient().jobs() if j.tag and tag in j.tag]
        if leftovers:
            subprocess.run(["scancel", *leftovers], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


def reading(util: float = 37.0, at: datetime | None = None) -> dict[str, Any]:
    return {"at": (at or datetime.now(UTC)).isoformat(), "gpu_uuid": "GPU-test", "gpu_index": 0,
            "util_pct": util, "mem_used_bytes": 1 << 30, "mem_total_bytes": 80 << 30, "power_w": 100.0,
            "sm_clock_mhz": 1400}  # fmt: skip


def secret_of(served: Served, which: str) -> str:
    replica = served.replicas[which]
    folder = replica_folder(served.root / "replicas", "alice", replica.deployment)
    return ReplicaCredentials.decode((folder / secret_file_name(replica.index)).read_bytes()).secret


def test_the_owner_reports_and_everyone_else_is_refused(served: Served) -> None:
    service, job = served.service, served.job("busy")
    replica = served.replicas["busy"]
    body = {"job_id": job, "samples": [reading()]}
    assert call(service, "alice", "POST", "/v1/telemetry", body) == {"stored": 1}  # her running job
    bob = call(service, "bob", "POST", "/v1/telemetry", body)
    assert bob["status"] == 403 and bob["error"] == f"telemetry for job {job}: not a running job of bob"
    assert call(service, "bob", "POST", "/v1/telemetry", body, tcp=True)["status"] == 403  # munge: bob
    assert call(service, "carol", "POST", "/v1/telemetry", body)["status"] == 403  # an admin is no owner
    as_replica = {**body, "deployment": replica.deployment, "index": replica.index}
    secret = {"Authorization": f"Replica {secret_of(served, 'busy')}"}
    stolen = call(service, "bob", "POST", "/v1/telemetry", as_replica, secret)  # bob's process, her secret
    assert stolen["status"] == 403 and "only its owner's job may report it, not bob" in stolen["error"]
    guessed = call(service, "alice", "POST", "/v1/telemetry", as_replica, {"Authorization": "Replica guess"})
    assert guessed["status"] == 403 and "wrong secret" in guessed["error"]
    other_job = {**as_replica, "job_id": served.job("idle")}
    assert call(service, "alice", "POST", "/v1/telemetry", other_job, secret)["status"] == 403
    assert call(service, "alice", "POST", "/v1/telemetry", {**body, "job_id": "1"})["status"] == 403
    url = f"http://127.0.0.1:{service.port}/v1/telemetry"
    nobody = httpx.post(url, json=body, timeout=30)  # TCP, no munge, no secret: no identity at all
    assert nobody.status_code == 403 and "no identity" in nobody.json()["error"]
    assert httpx.post(url, json=as_replica, headers=secret, timeout=30).json() == {"stored": 1}  # the secret
    with service.store() as store:
        users = {(r.user, r.kind, r.deployment) for r in store.gpu_samples(None, job_ids=[job])
                 if r.gpu_uuid == "GPU-test"}  # fmt: skip
    assert users == {("alice", "inference", None), ("alice", "inference", replica.deployment)}


def test_a_bad_report_is_one_line_naming_the_field(served: Served) -> None:
    job = served.job("busy")
    bad = call(served.service, "alice", "POST", "/v1/telemetry", {"job_id": job, "samples": [reading(140)]})
    assert bad["status"] == 400 and bad["error"].startswith("samples[0].util_pct: expected a number from 0")
    many = {"job_id": job, "samples": [reading()] * 257}
    too_many = call(served.service, "alice", "POST", "/v1/telemetry", many)
    assert too_many["status"] == 400 and "got 257 samples" in too_many["error"]


def flagged(served: Served) -> set[str]:
    answer = call(served.service, "carol", "GET", "/v1/idle")
    return {f["job_id"] for f in answer["flags"]}


def test_the_5pct_replica_is_flagged_idle_and_the_90pct_one_is_not(served: Served) -> None:
    idle, busy = served.job("idle"), served.job("busy")
    wait_until(lambda: idle in flagged(served), timeout=120, interval=1)
    answer = call(served.service, "carol", "GET", "/v1/idle")
    (flag,) = [f for f in answer["flags"] if f["job_id"] == idle]
    assert busy not in flagged(served)
    assert flag["user"] == "alice" and flag["kind"] == "inference" and flag["gpus"] == 1
    assert flag["mean_util_pct"] < 20 and flag["reason"].startswith("GPUs averaged")
    assert flag["gpu_hours_wasted"] > 0 and answer["gpu_hours_wasted"] >= flag["gpu_hours_wasted"]
    assert f"idle: job {idle} of alice (inference, 1 GPUs): GPUs averaged" in served.service.log()
    assert served.service.log().count(f"idle: job {idle} of alice") == 1  # one line per newly flagged job

    listed = served.service.run_as("carol", "idle", "--json")
    assert listed.returncode == 0, listed.stderr
    assert idle in {f["job_id"] for f in json.loads(listed.stdout)["flags"]}
    table = served.service.run_as("carol", "idle")
    assert table.returncode == 0 and idle in table.stdout and "GPU-hours wasted" in table.stdout


def test_ps_shows_gpu_and_idle_to_alice_only(served: Served) -> None:
    idle, busy = served.job("idle"), served.job("busy")
    wait_until(lambda: idle in flagged(served), timeout=120, interval=1)
    fast = json.loads(served.service.run_as("alice", "ps", "--json").stdout)
    mine = {j["id"]: j for j in fast if j["id"] in (idle, busy)}
    assert mine[idle]["idle"] is True and mine[idle]["gpu_util_pct"] < 20
    assert mine[busy]["idle"] is False and mine[busy]["gpu_util_pct"] > 70
    click_code = "from hpcserve.cli.main import main; main(['ps', '--json'])"
    slow = subprocess.run(["runuser", "-u", "alice", "--", sys.executable, "-c", click_code], cwd="/",
                          capture_output=True, text=True, env=served.service.user_env(), timeout=120,
                          check=True)  # fmt: skip
    by_click = {j["id"]: j for j in json.loads(slow.stdout) if j["id"] in (idle, busy)}
    assert {k: (v["idle"], v["state"]) for k, v in by_click.items()} == {
        k: (v["idle"], v["state"]) for k, v in mine.items()
    }
    table = served.service.run_as("alice", "ps", "--me")
    row = next(line for line in table.stdout.splitlines() if idle in line)
    assert "IDLE" in row and "%" in row
    busy_row = next(line for line in table.stdout.splitlines() if busy in line)
    assert "IDLE" not in busy_row

    for_bob = json.loads(served.service.run_as("bob", "ps", "--json").stdout)
    theirs = [j for j in for_bob if j["id"] in (idle, busy)]
    assert theirs and all(j["gpu_util_pct"] is None and j["idle"] is None for j in theirs)
    assert call(served.service, "bob", "GET", "/v1/telemetry/jobs") == {"jobs": []}
    alices = call(served.service, "alice", "GET", "/v1/telemetry/jobs")["jobs"]
    assert {r["job_id"] for r in alices} >= {idle, busy} and {r["user"] for r in alices} == {"alice"}


def test_only_admins_list_idle_jobs(served: Served) -> None:
    refused = served.service.run_as("bob", "idle")
    assert refused.returncode == 77 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "idle jobs are for admins; bob is not one" in refused.stderr
    assert call(served.service, "alice", "GET", "/v1/idle")["status"] == 403


def test_metrics_show_the_gpus_and_the_idle_flag(served: Served) -> None:
    idle, busy = served.job("idle"), served.job("busy")
    wait_until(lambda: idle in flagged(served), timeout=120, interval=1)
    text = httpx.get(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=30).text
    assert f'hpcserve_job_idle{{job_id="{idle}",kind="inference",user="alice"}} 1.0' in text
    assert f'job_id="{busy}",kind=' not in text
    util = [line for line in text.splitlines() if line.startswith("hpcserve_job_gpu_utilization_ratio{")]
    ratios = {line.split("job_id=")[1].split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in util}
    assert ratios[idle] < 0.2 and ratios[busy] > 0.7
    assert 'hpcserve_idle_gpu_hours{kind="inference"}' in text
    assert f'hpcserve_job_gpu_memory_total_bytes{{gpu="0",job_id="{idle}",user="alice"}}' in text
