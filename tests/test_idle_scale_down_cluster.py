"""The idle policy's optional action on the cluster: with ``idle.action.inference: scale_down`` and
``replica_no_requests_s: 20``, alice's two replicas that serve nothing are flagged (no request since they
started, from the controller's engine samples) and the service lowers her deployment's ``max_replicas`` from
2 to 1, so the autoscaler drains one replica at once instead of after its 300 s scale-down window; it never
goes below ``min_replicas``. One log line for each flag and for the action."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from hpcserve.slurm.cli_backend import CliSlurmClient
from tests.api_fixtures import ApiService
from tests.conftest import POLICY, wait_until
from tests.test_telemetry_cluster import call

pytestmark = pytest.mark.cluster
RULES = {"window_s": 3600, "replica_no_requests_s": 20, "action": {"inference": "scale_down"}}


@pytest.fixture
def service(slurm_env: dict[str, str]) -> Iterator[ApiService]:
    root = Path(tempfile.mkdtemp(prefix="hps-", dir="/tmp"))
    root.chmod(0o755)
    policy = yaml.safe_load(POLICY.read_text())
    policy["idle"] = RULES
    (root / "policy.yaml").write_text(yaml.safe_dump(policy))
    svc = ApiService(root, slurm_env, f"sqlite:///{root / 'state' / 'hpcserve.db'}", root / "policy.yaml")
    site = yaml.safe_load(svc.site.read_text())
    site["serving"] |= {"replica_dir": str(root / "replicas"), "controller_interval_s": 0.5,
                        "ready_timeout_s": 120}  # fmt: skip
    svc.site.write_text(yaml.safe_dump(site))
    svc.start("--sample-interval", "0", "--rebalance-interval", "0")
    try:
        svc.wait_ready()
        yield svc
    finally:
        svc.stop()
        with svc.store() as store:
            ids = [r.job_id for r in store.replicas() if r.job_id]
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_replicas_serving_nothing_are_scaled_down_to_min_replicas(service: ApiService) -> None:
    name = f"quiet-{uuid.uuid4().hex[:6]}"
    values = {"name": name, "model": "sim-model", "engine": "simulator", "gpus_per_replica": 1,
              "min_replicas": 2, "max_replicas": 2}  # fmt: skip
    assert call(service, "alice", "POST", "/v1/deployments", {"values": values}).get("owner") == "alice"

    def replicas(state: str = "ready") -> list[str]:
        with service.store() as store:
            return [str(r.job_id) for r in store.replicas(name) if r.state == state]

    wait_until(lambda: len(replicas()) == 2, timeout=180, interval=0.5)
    lowered = call(service, "alice", "PATCH", f"/v1/deployments/{name}", {"min_replicas": 1})
    assert lowered.get("min_replicas") == 1, lowered
    wait_until(lambda: "scaled down" in service.log(), timeout=120, interval=1)
    with service.store() as store:
        deployment = store.get_deployment(name)
    assert deployment is not None and deployment.spec["max_replicas"] == 1
    assert f"idle: deployment {name} scaled down: max_replicas 2 -> 1 (job " in service.log()
    assert "served no request for" in service.log()
    wait_until(lambda: len(replicas()) == 1 and not replicas("draining"), timeout=120, interval=1)
    wait_until(lambda: len([j for j in CliSlurmClient().jobs() if j.tag and name in j.tag]) == 1, timeout=60)
    # the one left is flagged as well (it serves nothing either), but min_replicas holds: a few ticks later
    # it still runs, max_replicas is still 1, and there was one scale-down only
    time.sleep(10)
    assert len(replicas()) == 1
    with service.store() as store:
        after = store.get_deployment(name)
    assert after is not None and after.spec["max_replicas"] == 1
    assert service.log().count(f"idle: deployment {name} scaled down") == 1
