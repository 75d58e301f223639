"""The shipped monitoring files against Debian's real Prometheus, on the real cluster: the test starts a
gateway and the service (metrics on loopback), serves one replica of the engine simulator as a Slurm job,
and starts ``/usr/bin/prometheus`` on a free loopback port with the shipped scrape config (its targets
pointed at this rig, 1 s intervals, the engines found through the service's /sd/engines) and a copy of the
shipped rules whose lease rules wait 1 s instead of minutes. Under load (chat requests through the gateway,
the replica's GPU readings posted through the API as its owner):
- every dashboard panel's query and every rule's expression (its comparison answered with ``bool``, so the
  quantity shows whether or not it fires) return finite data through Prometheus's HTTP API;
- HpcserveLeaseUnheld and HpcserveLeaseLost fire once another process takes the service's retention lease
  over (the store's takeover of a lease whose holder is gone), and did not before.
"""

from __future__ import annotations

import math
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from hpcserve.service.client import ServiceClient
from hpcserve.slurm.cli_backend import CliSlurmClient
from hpcserve.store import HistoryStore
from tests.conftest import POLICY, PREFIX, wait_until
from tests.monitoring_helpers import ALERTS_YML, PROMETHEUS_YML, panel_queries, rules, with_bool
from tests.test_serving_cluster import Serving, _up, chat, serve

pytestmark = pytest.mark.cluster
PROMETHEUS = Path("/usr/bin/prometheus")
FAST_RULES = {"HpcserveLeaseUnheld": "1s", "HpcserveLeaseLost": "1s"}
STOLEN = "retention"  # the service's lease it renews only hourly: taken over, it stays taken


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Rig:
    serving: Serving
    prometheus: str
    service_port: int
    db_url: str
    errors: list[str] = field(default_factory=list)

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", (expr, answer)
        return list(answer["data"]["result"])

    def alerts(self) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"])


def fast_rules(root: Path) -> Path:
    """The shipped rules, the lease rules' ``for`` cut to a second."""
    doc = yaml.safe_load(ALERTS_YML.read_text())
    for rule in doc["groups"][0]["rules"]:
        rule["for"] = FAST_RULES.get(rule["alert"], rule["for"])
    path = root / "alerts.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def prometheus_config(root: Path, service: int, gateway: int) -> Path:
    """The shipped scrape config, pointed at this rig, every interval 1 s."""
    doc = yaml.safe_load(PROMETHEUS_YML.read_text())
    doc["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    doc["rule_files"] = [str(fast_rules(root))]
    jobs = {c["job_name"]: c for c in doc["scrape_configs"]}
    assert set(jobs) == {"hpcserve-service", "hpcserve-gateway", "hpcserve-engines"}
    jobs["hpcserve-service"]["static_configs"] = [{"targets": [f"127.0.0.1:{service}"]}]
    jobs["hpcserve-gateway"]["static_configs"] = [{"targets": [f"127.0.0.1:{gateway}"]}]
    (sd,) = jobs["hpcserve-engines"]["http_sd_configs"]
    assert sd["url"].endswith(":9464/sd/engines")
    sd.update(url=f"http://127.0.0.1:{service}/sd/engines", refresh_interval="1s")
    path = root / "prometheus.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def idle_policy(root: Path) -> Path:
    """The default policy, a GPU idle under 20% for 6 s flagged (readings at most 3 s apart)."""
    doc = yaml.safe_load(POLICY.read_text())
    doc["idle"] = {"gpu_util_below_pct": 20, "window_s": 6, "sample_gap_s": 3, "replica_no_requests_s": None}
    path = root / "policy.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def rig(slurm: CliSlurmClient) -> Iterator[Rig]:
    if not PROMETHEUS.exists():
        pytest.skip("Debian's prometheus is not installed (apt-get install prometheus)")
    root = PREFIX / "jobs" / f"monitoring-{uuid.uuid4().hex[:8]}"  # every node and every user can reach it
    root.mkdir(parents=True)
    root.chmod(0o755)
    s = Serving(root)
    s.env["HPCSERVE_POLICY"] = str(idle_policy(root))
    service_port, gateway_port, prometheus_port = free_port(), free_port(), free_port()
    assert s.cli("db", "upgrade").returncode == 0
    s.start("gateway", "--port", str(s.port), "--keys", str(root / "keys.yaml"),
            "--metrics-listen", f"127.0.0.1:{gateway_port}", log="gateway.log")  # fmt: skip
    s.start("service", "--rebalance-interval", "0", "--sample-interval", "1",
            "--metrics-port", str(service_port), log="service.log")  # fmt: skip
    config = prometheus_config(root, service_port, gateway_port)
    prometheus = subprocess.Popen(
        [str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={root / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prometheus_port}", "--log.level=warn"],
        stdout=(root / "prometheus.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{prometheus_port}"
    try:
        wait_until(lambda: _up(s.url("/health")) and s.socket.exists() and _up(f"{url}/-/ready"), timeout=30)
        yield Rig(s, url, service_port, s.env["HPCSERVE_DATABASE_URL"])
    finally:
        prometheus.send_signal(signal.SIGTERM)
        try:
            prometheus.wait(timeout=20)
        except subprocess.TimeoutExpired:
            prometheus.kill()
        shutil.rmtree(root / "tsdb", ignore_errors=True)  # the logs stay, as the serving tests' do
        s.stop()
        tags = tuple(f"hpcserve:replica:{name}:" for name in s.names)
        leftovers = [j.id for j in slurm.jobs() if j.tag and j.tag.startswith(tags)]
        if leftovers:
            subprocess.run(["scancel", *leftovers], capture_output=True, check=False, timeout=60)


def reading(at: datetime, util_pct: float) -> dict[str, Any]:
    return {"at": at.isoformat(), "gpu_uuid": "GPU-5e1f7c2a-0000-4000-8000-00000000000a", "gpu_index": 0,
            "util_pct": util_pct, "mem_used_bytes": 9 << 30, "mem_total_bytes": 80 << 30, "power_w": 61.5,
            "sm_clock_mhz": 1410}  # fmt: skip


def load(rig: Rig, name: str, job_id: str, stop: threading.Event) -> None:
    """Chat requests through the gateway, streamed and not, and the replica's GPU at 5% posted every second
    (as its owner, over the service's socket); the 10 s before the first post are back-filled. What fails
    goes to ``rig.errors``."""
    client = ServiceClient(rig.serving.socket)
    now = datetime.now(UTC)
    readings = [reading(now - timedelta(seconds=s), 5.0) for s in range(10, -1, -1)]
    posted, i = 0.0, 0
    while not stop.is_set():
        try:
            if time.monotonic() - posted >= 1:
                client.call("POST", "/v1/telemetry", {"job_id": job_id, "samples": readings})
                posted, readings = time.monotonic(), [reading(datetime.now(UTC), 5.0)]
            answer = chat(rig.serving, name, stream=i % 2 == 0, max_tokens=8, timeout=30)
            if answer.status_code != 200:
                rig.errors.append(f"chat: {answer.status_code} {answer.text[:200]}")
        except Exception as exc:  # the test reads them; a dead thread would only stop the load
            rig.errors.append(f"{type(exc).__name__}: {exc}")
        i += 1
        stop.wait(0.2)


def missing(rig: Rig, queries: list[tuple[str, str]]) -> dict[str, str]:
    """The queries whose answer is empty or not a finite number, with what came back."""
    bad = {}
    for title, expr in queries:
        result = rig.query(expr)
        values = [float(r["value"][1]) for r in result]
        if not values or not all(math.isfinite(v) for v in values):
            bad[f"{title}: {expr}"] = repr(values)
    return bad


def firing(rig: Rig, alert: str) -> list[dict[str, Any]]:
    return [a for a in rig.alerts() if a["labels"]["alertname"] == alert and a["state"] == "firing"]


def test_panels_and_rules_return_data_and_the_lease_alerts_fire(rig: Rig) -> None:
    s = rig.serving
    name = s.name("watched")
    got = serve(s, name, "--min-replicas", "1", "--max-replicas", "1", "--wait", "--timeout", "120")
    (replica,) = got["replicas"]
    stop = threading.Event()
    worker = threading.Thread(target=load, args=(rig, name, replica["job_id"], stop), daemon=True)
    worker.start()
    try:
        queries = panel_queries() + [(r["alert"], with_bool(r["expr"])) for r in rules()]
        wait_until(lambda: not missing(rig, queries), timeout=60, interval=2)
    except AssertionError:
        pytest.fail(f"no finite data in 60 s for: {missing(rig, queries)} (load errors: {rig.errors[:3]})")
    finally:
        stop.set()
        worker.join(timeout=40)
    assert not rig.errors, rig.errors[:3]
    targets = httpx.get(f"{rig.prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert {(t["labels"]["job"], t["health"]) for t in targets} == {
        ("hpcserve-service", "up"), ("hpcserve-gateway", "up"), ("hpcserve-engines", "up")}  # fmt: skip
    engine = next(t for t in targets if t["labels"]["job"] == "hpcserve-engines")
    assert engine["labels"]["deployment"] == name and engine["labels"]["replica"] == "0"
    held = {r["metric"]["lease"]: r["value"][1] for r in rig.query("max by (lease) (hpcserve_lease_held)")}
    assert held == {"serving-controller": "1", "retention": "1", "idle": "1", "sampler": "1"}, held
    assert not firing(rig, "HpcserveLeaseUnheld") and not firing(rig, "HpcserveLeaseLost")

    with HistoryStore(rig.db_url) as store:  # another process takes the lease over, as from a dead holder
        holder = store.lock_holder(STOLEN)
        assert store.try_lock(STOLEN, "elsewhere:1", 3600, datetime.now(UTC), stale=holder)
    wait_until(lambda: bool(firing(rig, "HpcserveLeaseUnheld") and firing(rig, "HpcserveLeaseLost")),
               timeout=40, interval=1)  # fmt: skip
    (unheld,) = firing(rig, "HpcserveLeaseUnheld")
    assert unheld["labels"]["lease"] == STOLEN and unheld["labels"]["severity"] == "critical"
    assert unheld["annotations"]["summary"] == (
        f"No hpcserve service has held the {STOLEN} lease for 2 minutes: that job runs nowhere."
    )
    (lost,) = firing(rig, "HpcserveLeaseLost")
    assert lost["labels"]["lease"] == STOLEN and lost["labels"]["instance"] == f"127.0.0.1:{rig.service_port}"
    assert not firing(rig, "HpcserveSlurmctldUnreachable")
