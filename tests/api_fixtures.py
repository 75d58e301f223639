"""The service's API for the multi-user tests: ``hpcserve service`` started as root on a short-path Unix
socket (and a loopback TCP port for munge), with its own 0600 database, and the CLI run as real Unix users
through ``runuser``."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import POLICY, SITE, wait_until
from tests.service_fixtures import Service

USERS = ("alice", "bob", "carol")  # made by scripts/minicluster.sh; carol is in group hpcadmin


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def site_file(root: Path, database: str | None = None, **service: Any) -> Path:
    """site_configs/minicluster.yaml with the service's socket, TCP listener and admins (root and the
    group hpcadmin) set for this test."""
    data = yaml.safe_load(SITE.read_text())
    data["service"] = {**(data.get("service") or {}), **service}
    data["admins"] = ["root", "@hpcadmin"]
    if database:
        data["database"] = {"url": database}
    path = root / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    path.chmod(0o644)
    return path


class ApiService(Service):
    """``hpcserve service`` with its API: socket ``root/api.sock``, TCP on ``port``."""

    def __init__(self, root: Path, slurm_env: Mapping[str, str], db_url: str, policy: Path = POLICY) -> None:
        super().__init__(root, slurm_env, db_url, policy)
        self.port = free_port()
        self.socket = root / "api.sock"
        self.site = site_file(root, db_url, socket=str(self.socket), listen=f"127.0.0.1:{self.port}",
                              url=f"http://127.0.0.1:{self.port}")  # fmt: skip
        self.env |= {"HPCSERVE_SITE": str(self.site), "HPCSERVE_SOCKET": str(self.socket)}

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_until(lambda: _answers(self.socket), timeout=timeout)

    def user_env(self) -> dict[str, str]:
        """What a user's shell would have: the cluster, the site config and the service's socket; never the
        service's database."""
        env = {k: v for k, v in self.env.items() if not k.startswith(("HPCSERVE_DATABASE", "HPCSERVE_REBAL"))}
        return env

    def run_as(
        self, user: str, *args: str, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``hpcserve ARGS`` as ``user`` (runuser), with the user's environment."""
        argv = ["runuser", "-u", user, "--", sys.executable, "-m", "hpcserve", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                              env={**self.user_env(), **(env or {})}, cwd="/")  # fmt: skip


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


@pytest.fixture
def short_root() -> Iterator[Path]:
    """A folder with a short path (a Unix socket's path must fit 108 bytes) that every user can enter."""
    root = Path(tempfile.mkdtemp(prefix="hps-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def api_service(short_root: Path, slurm_env: dict[str, str]) -> Iterator[ApiService]:
    """A running service (as root) with its API on a socket in ``short_root`` and a database only it reads."""
    db = short_root / "state" / "hpcserve.db"
    service = ApiService(short_root, slurm_env, f"sqlite:///{db}")
    service.start("--sample-interval", "0", "--rebalance-interval", "0")
    try:
        service.wait_ready()
        yield service
    finally:
        service.stop()
        cancel_replicas(service)


def cancel_replicas(service: Service) -> None:
    """Cancel the replica jobs the service recorded: a stopped service leaves its replicas running (as a
    real one does across restarts), and they would hold the next test's GPUs."""
    try:
        with service.store() as store:
            ids = [r.job_id for r in store.replicas() if r.job_id]
    except Exception:  # the test never got as far as a database
        return
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, check=False, timeout=60)
