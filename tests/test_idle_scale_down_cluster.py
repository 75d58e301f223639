"""The idle policy's optional action on the cluster: with ``idle.action.inference: scale_down`` and
``replica_no_requests_s: 20``, alice's two replicas that serve nothing are flagged (no request since they
started, from the controller's engine samples) and the service lowers her deployment's ``max_replicas`` from
2 to 1, so the autoscaler drains one replica at once instead of after its 300 s scale-down window; it never
goes below ``min_replicas``. One log line for each flag and for the action.

A model pool of two engine-simulator members, whose two replica jobs serve nothing, is scaled down the way
a pool's bounds are changed (each member's ``max_replicas`` 2 -> 1, the pool's derived again), drains to one
job, and a member leaving does not undo it."""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from hpcserve.slurm.cli_backend import CliSlurmClient
from tests.api_fixtures import ApiService, cancel_replicas
from tests.conftest import POLICY, wait_until
from tests.test_telemetry_cluster import call

pytestmark = pytest.mark.cluster
RULES = {"window_s": 3600, "replica_no_requests_s": 20, "action": {"inference": "scale_down"}}
POOL_RULES = RULES | {"replica_no_requests_s": 45}  # time to lower the members' min before the flags


@pytest.fixture
def service(slurm_env: dict[str, str]) -> Iterator[ApiService]:
    with idle_service(slurm_env, RULES) as svc:
        yield svc


@pytest.fixture
def pool_service(slurm_env: dict[str, str]) -> Iterator[ApiService]:
    with idle_service(slurm_env, POOL_RULES, {"HPCSERVE_ENGINE_SIM_SLEEP_TIME_SCALE": "0.1"}) as svc:
        yield svc


@contextmanager
def idle_service(
    slurm_env: dict[str, str], rules: dict[str, Any], replica_env: dict[str, str] | None = None
) -> Iterator[ApiService]:
    """A service whose policy's idle section is ``rules`` (``replica_env``: the site's, for the replicas)."""
    root = Path(tempfile.mkdtemp(prefix="hps-", dir="/tmp"))
    root.chmod(0o755)
    policy = yaml.safe_load(POLICY.read_text())
    policy["idle"] = rules
    (root / "policy.yaml").write_text(yaml.safe_dump(policy))
    svc = ApiService(root, slurm_env, f"sqlite:///{root / 'state' / 'hpcserve.db'}", root / "policy.yaml")
    site = yaml.safe_load(svc.site.read_text())
    site["serving"] |= {"replica_dir": str(root / "replicas"), "controller_interval_s": 0.5,
                        "ready_timeout_s": 120}  # fmt: skip
    if replica_env:
        site["serving"]["replica_env"] = replica_env
    svc.site.write_text(yaml.safe_dump(site))
    svc.start("--sample-interval", "0", "--rebalance-interval", "0")
    try:
        svc.wait_ready()
        yield svc
    finally:
        svc.stop()
        cancel_replicas(svc)
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


def test_an_idle_pool_is_scaled_down_through_its_members_bounds(pool_service: ApiService) -> None:
    service, pool = pool_service, f"idlepool-{uuid.uuid4().hex[:6]}"
    members = [f"{pool}-a", f"{pool}-b"]
    for member in members:
        values = {"name": member, "model": "sim-model", "engine": "simulator", "gpus_per_replica": 1,
                  "min_replicas": 0, "max_replicas": 2, "pool": pool}  # fmt: skip
        created = call(service, "alice", "POST", "/v1/deployments", {"values": values})
        assert created.get("owner") == "alice", created
    # both members in the pool before its jobs start (a member joining later has them replaced), then
    # the pool's min (its members' most) raised to 2, and lowered to 1 once both jobs run
    raised = call(service, "alice", "PATCH", f"/v1/deployments/{members[0]}", {"min_replicas": 2})
    assert raised.get("min_replicas") == 2, raised

    def replicas(state: str = "ready") -> list[str]:
        with service.store() as store:
            return [str(r.job_id) for r in store.replicas(pool) if r.state == state]

    def bounds() -> dict[str, int]:
        with service.store() as store:
            return {
                d.name: d.spec["max_replicas"] for d in store.list_deployments() if d.name.startswith(pool)
            }

    wait_until(lambda: len(replicas()) == 2, timeout=180, interval=0.5)
    lowered = call(service, "alice", "PATCH", f"/v1/deployments/{members[0]}", {"min_replicas": 1})
    assert lowered.get("min_replicas") == 1, lowered
    wait_until(lambda: f"idle: pool {pool} scaled down" in service.log(), timeout=120, interval=1)
    assert bounds() == {pool: 1, members[0]: 1, members[1]: 1}
    assert (f"idle: pool {pool} scaled down: max_replicas 2 -> 1 on its members {', '.join(members)} "
            "(job ") in service.log()  # fmt: skip
    wait_until(lambda: len(replicas()) == 1 and not replicas("draining"), timeout=120, interval=1)
    wait_until(lambda: len([j for j in CliSlurmClient().jobs() if j.tag and pool in j.tag]) == 1, timeout=60)
    assert service.log().count(f"idle: pool {pool} scaled down") == 1
    gone = call(service, "alice", "DELETE", f"/v1/deployments/{members[1]}")
    assert gone.get("name") == members[1], gone
    assert bounds() == {pool: 1, members[0]: 1}  # the pool derived from the member left: still 1
