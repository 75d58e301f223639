"""``hpcserve service`` through real outages of what it depends on:
- slurmctld stopped for 60 s: the service keeps running and serving /metrics, the sampler logs the gap
  once when it starts and once when it ends (the other jobs a line per failed tick, no traceback), and it
  samples again once slurmctld is back;
- PostgreSQL restarted under it (the store's database): the ticks that meet the restart log one line and
  fail, the next ones reconnect and samples are written again.

Both restart a real daemon, so they run last, with the tests that stop the cluster (see conftest.py).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from hpcserve.slurm.cli_backend import CliSlurmClient
from hpcserve.store import HistoryStore
from tests.conftest import REPO, wait_until
from tests.service_fixtures import Service
from tests.store_helpers import scratch_database
from tests.test_serving_cluster import free_port

pytestmark = [pytest.mark.cluster, pytest.mark.disruptive]
OUTAGE_S = 60.0


def samples_since(store_url: str, since: datetime) -> int:
    with HistoryStore(store_url) as store:
        return len(store.queue_samples(since=since))


def slurmctld_pid() -> int:
    out = subprocess.run(
        ["scontrol", "show", "config"], capture_output=True, text=True, check=True, timeout=30
    )
    match = re.search(r"^SlurmctldPidFile\s*=\s*(\S+)", out.stdout, re.MULTILINE)
    assert match is not None, "scontrol show config names no SlurmctldPidFile"
    return int(Path(match[1]).read_text().split()[0])


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def metrics(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


@pytest.fixture
def slurmctld_stopped_later(slurm: CliSlurmClient) -> Iterator[None]:
    """Whatever the test does to slurmctld, the project's own script starts it again afterwards."""
    try:
        yield
    finally:
        subprocess.run(["bash", str(REPO / "scripts" / "minicluster.sh"), "start"], check=True,
                       capture_output=True, timeout=300)  # fmt: skip


@pytest.mark.usefixtures("slurmctld_stopped_later")
def test_service_rides_out_slurmctld_stopped_for_a_minute(tmp_path: Path, slurm_env: dict[str, str]) -> None:
    url, port = f"sqlite:///{tmp_path}/h.db", free_port()
    with HistoryStore(url) as store:
        store.upgrade()
    service = Service(tmp_path, slurm_env, url)
    proc = service.start("--sample-interval", "2", "--rebalance-interval", "5", "--metrics-port", str(port))
    try:
        wait_until(lambda: samples_since(url, datetime.fromtimestamp(0, UTC)) >= 3, timeout=60, interval=0.5)

        pid = slurmctld_pid()
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: gone(pid), timeout=60, interval=0.2)
        stopped = datetime.now(UTC)
        deadline = time.monotonic() + OUTAGE_S
        while time.monotonic() < deadline:  # the whole minute: alive, and /metrics says Slurm is down
            assert proc.poll() is None, service.log()
            time.sleep(5)
        assert re.search(r"^hpcserve_sampler_slurmctld_unreachable 1\.0$", metrics(port), re.MULTILINE), (
            metrics(port)
        )
        assert samples_since(url, stopped) == 0

        subprocess.run(["bash", str(REPO / "scripts" / "minicluster.sh"), "start"], check=True,
                       capture_output=True, timeout=300)  # fmt: skip
        back = datetime.now(UTC)
        wait_until(lambda: samples_since(url, back) >= 3, timeout=60, interval=0.5)
        assert proc.poll() is None
        assert re.search(r"^hpcserve_sampler_slurmctld_unreachable 0\.0$", metrics(port), re.MULTILINE)
    finally:
        service.stop()
    log = service.log()
    went = re.findall(r"slurmctld unreachable since (\S+): ", log)
    came = re.findall(r"slurmctld answers again: no queue samples from (\S+) to (\S+) \((\d+) s gap\)", log)
    assert len(went) == 1 and len(came) == 1, log
    assert came[0][0] == went[0] and OUTAGE_S - 5 <= int(came[0][2]) <= OUTAGE_S + 120, came
    assert "Traceback" not in log, log  # the other jobs' failed ticks are one line each
    assert re.search(r"rebalance: Slurm command failed \(.*Unable to contact slurm controller", log), log


@pytest.mark.postgres
def test_service_reconnects_after_postgres_restarts(tmp_path: Path, slurm_env: dict[str, str]) -> None:
    versions = sorted(p.name for p in Path("/etc/postgresql").iterdir())
    assert versions, "no PostgreSQL cluster in /etc/postgresql"
    with scratch_database() as url:
        with HistoryStore(url) as store:
            store.upgrade()
        service = Service(tmp_path, slurm_env, url)
        proc = service.start("--sample-interval", "1", "--rebalance-interval", "0")
        try:
            wait_until(lambda: samples_since(url, datetime.fromtimestamp(0, UTC)) >= 3, timeout=60)
            started = postmaster_start(url)

            restart = ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "restart"]
            subprocess.run(restart, check=True, capture_output=True, timeout=120)
            back = datetime.now(UTC)
            assert postmaster_start(url) > started  # it really restarted: every old connection is gone

            wait_until(lambda: samples_since(url, back) >= 3, timeout=60, interval=0.5)
            assert proc.poll() is None, service.log()
        finally:
            service.stop()
    assert "Traceback" not in service.log(), service.log()


def postmaster_start(url: str) -> datetime:
    with HistoryStore(url) as store, store.engine.connect() as conn:
        started: datetime = conn.exec_driver_sql("SELECT pg_postmaster_start_time()").scalar_one()
        return started
