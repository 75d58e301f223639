"""``hpcserve service`` as a subprocess for the cluster tests: its own database (which it migrates at start,
and which holds the planner state), policy and log files, started and killed as an operator (or a crash)
would."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from hpcserve.rebalance.executor import CRASH_ENV
from hpcserve.store import HistoryStore
from tests.conftest import POLICY, SITE

# The planner's rules for tests that let it decide: act on the first cycle (no hysteresis, headroom,
# cooldown or release window), so a test sees a move seconds after the demand appears.
EAGER_RULES = {"horizon_s": 60, "headroom": 0.0, "hysteresis_cycles": 1, "cooldown_s": 0,
               "release_window_s": 0, "max_moves_per_cycle": 2, "spare_ending_within_s": 0}  # fmt: skip


def policy_file(root: Path, rules: Mapping[str, Any], grace_s: int | None = None) -> Path:
    """policies/default.yaml with ``rules`` over its rebalance rules (and the training class's grace)."""
    data = yaml.safe_load(POLICY.read_text())
    data["rebalance"] = {**(data.get("rebalance") or {}), **rules}
    if grace_s is not None:
        data["classes"]["training"]["grace_s"] = grace_s
    path = root / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def terminate(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 30) -> None:
    """SIGTERM each process still running, then SIGKILL those that outlive ``timeout``."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Service:
    """Runs ``hpcserve service`` (each start logs to its own file) against ``db_url``."""

    def __init__(self, root: Path, slurm_env: Mapping[str, str], db_url: str, policy: Path = POLICY) -> None:
        self.root, self.db_url = root, db_url
        self.env = {**slurm_env, "HPCSERVE_SITE": str(SITE), "HPCSERVE_POLICY": str(policy),
                    "HPCSERVE_DATABASE_URL": db_url}  # fmt: skip
        self.env.pop(CRASH_ENV, None)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def start(self, *args: str, crash: str | None = None) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "hpcserve", "service", "--metrics-port", "0", *args]
        env = {**self.env, **({CRASH_ENV: crash} if crash else {})}
        log = self.root / f"service-{len(self.logs) + 1}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def log(self, index: int = -1) -> str:
        return self.logs[index].read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM every service still running (what an operator's systemctl stop does)."""
        terminate(self.procs)

    def store(self) -> HistoryStore:
        return HistoryStore(self.db_url)
