"""Two services on one PostgreSQL database, one acting: the standby takes over when the active one is killed
with -9, within the lease's time, and carries on from the state the active one left (the scale-down window,
the replicas it launched), on the real cluster.

Both run ``hpcserve service`` as root with the same site and database (sockets of their own). alice's
deployment (min 1, max 2, a 10-minute scale-down window) is pushed to 2 replicas by a burst the gateway
buffered (a sample written as the gateway writes it), then goes quiet: the active service holds 2 replicas
inside the window. The standby acts on nothing until the active one dies."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from hpcserve.serving.gateway.stats import GatewaySample
from hpcserve.serving.gateway_store import report_to_store
from hpcserve.slurm.cli_backend import CliSlurmClient
from tests.api_fixtures import ApiService
from tests.conftest import wait_until
from tests.store_helpers import scratch_database
from tests.test_replicas_as_owner import call_as

pytestmark = [pytest.mark.cluster, pytest.mark.postgres]

NAME = "standby-llm"
LEASE = "serving-controller"


def _service(root: Path, slurm_env: dict[str, str], url: str) -> ApiService:
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    service = ApiService(root, slurm_env, url)
    site = yaml.safe_load(service.site.read_text())
    site["serving"] |= {"replica_dir": str(root.parent / "replicas"), "controller_interval_s": 0.5,
                        "ready_timeout_s": 60}  # fmt: skip
    service.site.write_text(yaml.safe_dump(site))
    return service


@pytest.fixture
def pair(slurm_env: dict[str, str]) -> Iterator[tuple[ApiService, ApiService]]:
    top = Path(tempfile.mkdtemp(prefix="hps-", dir="/tmp"))
    top.chmod(0o755)
    with scratch_database() as url:
        active, standby = _service(top / "a", slurm_env, url), _service(top / "b", slurm_env, url)
        try:
            yield active, standby
        finally:
            standby.stop()
            active.stop()
            leftovers = [j.id for j in CliSlurmClient().jobs() if j.tag and NAME in j.tag]
            if leftovers:
                import subprocess

                subprocess.run(["scancel", *leftovers], capture_output=True, check=False)
            shutil.rmtree(top, ignore_errors=True)


def _ready(service: ApiService) -> dict[int, str]:
    with service.store() as store:
        return {r.index: str(r.job_id) for r in store.replicas(NAME) if r.state == "ready"}


def _scaler(service: ApiService) -> dict[str, Any]:
    with service.store() as store:
        return dict(store.states("scaler:")[f"scaler:{NAME}"]["state"])


def _holder(service: ApiService) -> str | None:
    with service.store() as store:
        return store.lock_holder(LEASE)


def test_the_standby_takes_over_a_killed_service_and_keeps_its_state(
    pair: tuple[ApiService, ApiService],
) -> None:
    active, standby = pair
    first = active.start("--sample-interval", "0", "--rebalance-interval", "0")
    active.wait_ready()
    spec = {"name": NAME, "model": "sim-model", "engine": "simulator", "gpus_per_replica": 1,
            "min_replicas": 1, "max_replicas": 2, "scale_up_window_s": 0,
            "scale_down_window_s": 600}  # fmt: skip
    assert call_as(active, "alice", "POST", "/v1/deployments", {"values": spec}).get("owner") == "alice"
    wait_until(lambda: len(_ready(active)) == 1, timeout=90)
    with active.store() as store:  # a burst buffered at a gateway, as it reports it: the autoscaler wants 2
        report = report_to_store(store, "login1:8000")

        def buffered() -> bool:
            report([GatewaySample(datetime.now(UTC), NAME, 40, 0, 0.0)])
            return len(_ready(active)) == 2

        wait_until(buffered, timeout=90, interval=1.0)
    time.sleep(15)  # quiet since: inside the 10-minute window both replicas stay
    second = standby.start("--sample-interval", "0", "--rebalance-interval", "0")
    standby.wait_ready()
    time.sleep(5)
    assert _holder(active) is not None and _holder(active).endswith(f":{first.pid}")  # type: ignore[union-attr]
    before, replicas = _scaler(active), _ready(active)
    assert before["needed_at"] and len(replicas) == 2

    first.kill()  # -9: no lease released, no goodbye
    first.wait()
    killed = time.monotonic()
    wait_until(lambda: (_holder(standby) or "").endswith(f":{second.pid}"), timeout=15, interval=0.2)
    took = time.monotonic() - killed
    time.sleep(10)  # the standby ticks on
    after = _scaler(standby)
    assert _ready(standby) == replicas  # the same two jobs: none relaunched, none dropped
    for kept in ("needed_at", "last_scale", "above_since"):  # the window is where the active one left it
        assert after[kept] == before[kept], (kept, before, after)
    assert took < 15
    assert "took over" in standby.log() or "taken over" in standby.log()
