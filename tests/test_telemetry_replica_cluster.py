"""GPU telemetry from INSIDE a replica job, on the real cluster, through a real service.

The site's ``serving.replica_env`` gives every replica job the recorded NVML device (``LD_LIBRARY_PATH`` to
the gcc-built ``libnvidia-ml.so.1``, ``HPCSERVE_NVML_RECORDING`` to the ~5% recording, a 1 s interval). alice
serves one deployment; its replica (her Slurm job) samples its GPU with pynvml and reports it itself
(``ReplicaMain.report_telemetry``, after it announces), with its secret. No reporter runs on the login node:
the readings (the recording's own GPU UUID) can only come from the job. They reach the service (alice's
``GET /v1/telemetry/jobs``, her ``hpcserve ps``, /metrics), and after the policy's 20 s window the job is
flagged idle (carol's ``hpcserve idle``). bob sees none of it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from hpcserve.slurm.cli_backend import CliSlurmClient
from hpcserve.store import Replica
from tests.api_fixtures import ApiService, cancel_replicas, free_port
from tests.conftest import POLICY, wait_until
from tests.nvml_fixtures import IDLE, LIBRARY, build_recorded_nvml
from tests.test_telemetry_cluster import IDLE_RULES, SIM, call

pytestmark = pytest.mark.cluster


def recorded_utils(recording: Path) -> dict[str, tuple[float, float]]:
    """Each device's (lowest, highest) utilisation in the recording: ``sample T UUID UTIL ...`` lines."""
    utils: dict[str, list[float]] = {}
    for line in recording.read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "sample":
            utils.setdefault(parts[2], []).append(float(parts[3]))
    return {gpu: (min(values), max(values)) for gpu, values in utils.items()}


@dataclass
class Served:
    service: ApiService
    metrics_port: int
    replica: Replica

    @property
    def job(self) -> str:
        assert self.replica.job_id is not None
        return self.replica.job_id


@pytest.fixture(scope="module")
def served(slurm_env: dict[str, str]) -> Iterator[Served]:
    """A service whose site gives replicas the recorded idle device, with a 20 s idle window; alice's one
    deployment ready. Everything the job reads is in a 0755 folder under /tmp (the job runs as alice)."""
    root = Path(tempfile.mkdtemp(prefix="hps-", dir="/tmp"))
    root.chmod(0o755)
    library = build_recorded_nvml(root / "nvml")
    library.chmod(0o755)
    (library / LIBRARY).chmod(0o755)
    recording = Path(shutil.copy(IDLE, root / "idle.rec"))
    recording.chmod(0o644)
    policy = yaml.safe_load(POLICY.read_text())
    policy["idle"] = IDLE_RULES
    (root / "policy.yaml").write_text(yaml.safe_dump(policy))
    service = ApiService(root, slurm_env, f"sqlite:///{root / 'state' / 'hpcserve.db'}", root / "policy.yaml")
    site = yaml.safe_load(service.site.read_text())
    replica_env = {"LD_LIBRARY_PATH": str(library), "HPCSERVE_NVML_RECORDING": str(recording),
                   "HPCSERVE_TELEMETRY_INTERVAL_S": "1"}  # fmt: skip
    site["serving"] |= {"replica_dir": str(root / "replicas"), "controller_interval_s": 0.5,
                        "ready_timeout_s": 120, "replica_env": replica_env}  # fmt: skip
    service.site.write_text(yaml.safe_dump(site))
    assert not {"LD_LIBRARY_PATH", "HPCSERVE_NVML_RECORDING"} & set(service.env)  # only the site gives them
    port, name = free_port(), f"inside-{uuid.uuid4().hex[:6]}"
    service.start("--sample-interval", "0", "--rebalance-interval", "0", "--metrics-port", str(port))
    try:
        service.wait_ready()
        created = call(service, "alice", "POST", "/v1/deployments", {"values": {"name": name, **SIM}})
        assert created.get("owner") == "alice", created

        def ready() -> list[Replica]:
            with service.store() as store:
                return [r for r in store.replicas() if r.deployment == name and r.state == "ready"]

        wait_until(lambda: bool(ready()), timeout=120, interval=0.5)
        yield Served(service, port, ready()[0])
    finally:
        service.stop()
        cancel_replicas(service)
        leftovers = [j.id for j in CliSlurmClient().jobs() if j.tag and name in j.tag]
        if leftovers:
            subprocess.run(["scancel", *leftovers], capture_output=True, check=False, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def alices_row(served: Served) -> dict[str, Any] | None:
    rows = call(served.service, "alice", "GET", "/v1/telemetry/jobs")["jobs"]
    return next((r for r in rows if r["job_id"] == served.job), None)


def test_the_replica_job_itself_reports_the_recorded_gpu(served: Served) -> None:
    wait_until(lambda: alices_row(served) is not None, timeout=60, interval=1)
    row = alices_row(served)
    assert row is not None
    assert (row["user"], row["kind"], row["deployment"], row["gpus"]) == (
        "alice", "inference", served.replica.deployment, 1,
    )  # fmt: skip
    with served.service.store() as store:
        samples = store.gpu_samples(None, job_ids=[served.job])
    recorded = recorded_utils(IDLE)
    assert samples and {s.gpu_uuid for s in samples} <= set(recorded)  # the recording's own GPU: the job's
    assert {s.deployment for s in samples} == {served.replica.deployment}  # posted with the replica's secret
    low, high = recorded[samples[0].gpu_uuid]
    assert all(low <= s.util_pct <= high for s in samples) and low <= row["util_pct"] <= high

    mine = {j["id"]: j for j in json.loads(served.service.run_as("alice", "ps", "--json").stdout)}
    assert low <= mine[served.job]["gpu_util_pct"] <= high
    gauge, job = "hpcserve_job_gpu_utilization_ratio{", f'job_id="{served.job}"'

    def gauge_lines() -> list[str]:  # the collector lists running jobs from the service's (calm) Slurm read
        text = httpx.get(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=30).text
        return [x for x in text.splitlines() if x.startswith(gauge) and job in x]

    wait_until(lambda: len(gauge_lines()) == 1, timeout=60, interval=1)
    (line,) = gauge_lines()
    assert 'user="alice"' in line and low / 100 <= float(line.rsplit(" ", 1)[1]) <= high / 100

    assert call(served.service, "bob", "GET", "/v1/telemetry/jobs") == {"jobs": []}
    for_bob = {j["id"]: j for j in json.loads(served.service.run_as("bob", "ps", "--json").stdout)}
    assert served.job in for_bob  # bob sees the job in the queue, as squeue shows it ...
    assert for_bob[served.job]["gpu_util_pct"] is None and for_bob[served.job]["idle"] is None  # ... no more


def idle_list(served: Served) -> set[str]:
    listed = served.service.run_as("carol", "idle", "--json")
    assert listed.returncode == 0, listed.stderr
    return {f["job_id"] for f in json.loads(listed.stdout)["flags"]}


def test_after_the_window_the_replica_is_flagged_idle(served: Served) -> None:
    wait_until(lambda: served.job in idle_list(served), timeout=90, interval=2)
    (flag,) = [
        f for f in call(served.service, "carol", "GET", "/v1/idle")["flags"] if f["job_id"] == served.job
    ]
    assert flag["user"] == "alice" and flag["kind"] == "inference" and flag["mean_util_pct"] < 20
    assert f"idle: job {served.job} of alice (inference, 1 GPUs)" in served.service.log()
    mine = {j["id"]: j for j in json.loads(served.service.run_as("alice", "ps", "--json").stdout)}
    assert mine[served.job]["idle"] is True
    refused = served.service.run_as("bob", "idle")
    assert refused.returncode == 77 and served.job not in refused.stdout + refused.stderr
    assert call(served.service, "bob", "GET", "/v1/idle")["status"] == 403
