"""Shared fixtures. Tests marked ``cluster`` run against the real local Slurm cluster that
``scripts/minicluster.sh start`` brings up (README command (b) starts it); they fail, not skip, without it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hpcserve.slurm.cli_backend import CliSlurmClient

pytest_plugins = ("tests.api_fixtures",)  # the service API fixtures (api_service, short_root)

REPO = Path(__file__).resolve().parent.parent
PREFIX = Path(os.environ.get("MINICLUSTER_PREFIX", "/tmp/hpcserve-mc"))
SITE = REPO / "site_configs" / "minicluster.yaml"
POLICY = REPO / "policies" / "default.yaml"


def _traces_dir() -> Path:
    """The shared public traces (never shipped with hpcserve): $HPCSERVE_TRACES, else shared/traces beside
    the checkout, else this workplace's copy."""
    candidates = [os.environ.get("HPCSERVE_TRACES"), REPO.parent / "shared" / "traces", "/work/shared/traces"]
    found = [Path(c) for c in candidates if c and Path(c).is_dir()]
    return found[0] if found else REPO.parent / "shared" / "traces"


TRACES = _traces_dir()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that stop the cluster run last, so every other cluster test sees it up."""
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)


@pytest.fixture(scope="session")
def slurm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("SLURM_CONF", str(PREFIX / "etc" / "slurm.conf"))
    os.environ["SLURM_CONF"] = env["SLURM_CONF"]
    return env


@pytest.fixture(scope="session")
def slurm(slurm_env: dict[str, str]) -> CliSlurmClient:
    client = CliSlurmClient(timeout=30)
    ping = client.ping()
    if not ping.ok:
        pytest.fail(f"the local Slurm cluster is not up ({ping.detail}); run scripts/minicluster.sh start")
    return client


@pytest.fixture
def hpcserve(slurm_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real ``hpcserve`` CLI in a subprocess, as a user would."""

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "hpcserve", *args], capture_output=True, text=True, timeout=120,
            env={**slurm_env, **(env or {})}, check=False,
        )  # fmt: skip

    return run


@pytest.fixture
def job_dir() -> Path:
    """A fresh folder that every node can write (the nodes share this machine's filesystem)."""
    path = PREFIX / "jobs" / f"pytest-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    path.chmod(0o1777)
    return path


@pytest.fixture
def submitted(slurm: CliSlurmClient) -> Iterator[list[str]]:
    """Job ids a test submitted; whatever is left is cancelled afterwards (only these jobs)."""
    ids: list[str] = []
    yield ids
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, check=False)


def write_weights(folder: Path, files: dict[str, int]) -> None:
    """A model folder of random bytes (``{relative path: size}``): weights for staging tests."""
    for rel, size in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.2) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
