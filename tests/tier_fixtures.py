"""Shared by the tier and pool cluster tests: a gateway and a service as in test_serving_cluster, whose
replica jobs run the engine simulator's sleep mode with its times scaled by ``SLEEP_SCALE`` (the site's
``serving.replica_env``), and readers of what the replicas announced (the service's database), their
agents (``GET /hpcserve/engines``) and their engines (``/is_sleeping``, ``/metrics``)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from hpcserve.slurm.cli_backend import CliSlurmClient
from hpcserve.store import HistoryStore, Replica
from tests.conftest import PREFIX, wait_until
from tests.test_serving_cluster import Serving, _up

SLEEP_SCALE = 0.1  # the engine simulator's --sleep-time-scale in the replica jobs
ASLEEP_COUNTER = "hpcserve_enginesim_requests_while_asleep_total"


@pytest.fixture
def tiers(slurm: CliSlurmClient) -> Iterator[Serving]:
    root = PREFIX / "jobs" / f"tiers-{uuid.uuid4().hex[:8]}"  # every node and every user can reach it
    root.mkdir(parents=True)
    root.chmod(0o755)
    s = Serving(root)
    site = yaml.safe_load((root / "site.yaml").read_text())
    site["serving"]["replica_env"] = {"HPCSERVE_ENGINE_SIM_SLEEP_TIME_SCALE": str(SLEEP_SCALE)}
    (root / "site.yaml").write_text(yaml.safe_dump(site))
    assert s.cli("db", "upgrade").returncode == 0
    s.start("gateway", "--port", str(s.port), "--keys", str(root / "keys.yaml"), "--metrics-listen", "off",
            log="gateway.log")  # fmt: skip
    s.start("service", "--rebalance-interval", "0", "--metrics-port", "0", log="service.log")
    wait_until(lambda: _up(s.url("/health")) and s.socket.exists(), timeout=30)
    yield s
    s.stop()
    tags = tuple(f"hpcserve:replica:{name}:" for name in s.names)
    leftovers = [j.id for j in slurm.jobs() if j.tag and j.tag.startswith(tags)]
    if leftovers:
        subprocess.run(["scancel", *leftovers], capture_output=True, check=False, timeout=60)


def replicas(s: Serving, name: str) -> list[Replica]:
    """The replicas the service recorded for ``name`` (its database; the test runs as root)."""
    with HistoryStore(s.env["HPCSERVE_DATABASE_URL"]) as store:
        return store.replicas(name)


def ready_replica(s: Serving, name: str) -> Replica:
    """The one ready replica of ``name`` once it announced its engines (``models``)."""
    found: list[Replica] = []

    def ready() -> bool:
        found[:] = [r for r in replicas(s, name) if r.state == "ready" and r.models]
        return bool(found)

    wait_until(ready, timeout=30)
    return found[0]


def agent_engines(replica: Replica) -> dict[str, Any]:
    """The replica agent's engines: {name: {"port", "state", "last_used"}}."""
    headers = {"Authorization": f"Bearer {replica.engine_key}"} if replica.engine_key else {}
    answer = httpx.get(f"{replica.url}/hpcserve/engines", headers=headers, timeout=5)
    answer.raise_for_status()
    engines: dict[str, Any] = answer.json()["engines"]
    return engines


def engine_url(replica: Replica, model: str) -> str:
    assert replica.models is not None and replica.host
    return f"http://{replica.host}:{replica.models[model]}"


def is_sleeping(url: str) -> bool:
    return bool(httpx.get(f"{url}/is_sleeping", timeout=5).json()["is_sleeping"])


def requests_while_asleep(url: str) -> float:
    """The simulator's count of /v1 requests that reached it while it slept."""
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(ASLEEP_COUNTER):
            return float(line.split()[-1])
    raise AssertionError(f"{url}/metrics has no {ASLEEP_COUNTER}")
