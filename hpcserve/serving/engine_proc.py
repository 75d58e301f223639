"""An engine process on a replica's node: its command and environment, a free port for it, waiting until it
serves, and the signals a replica job passes on to it or keeps from it.

Shared by the plain replica (``hpcserve.serving.replica``), the replica with sleep mode
(``hpcserve.serving.pool_replica``) and the start's measurement (``hpcserve.serving.start_probe``); it
imports none of them, so none imports another through it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from types import FrameType
from typing import Any

from hpcserve.errors import HpcserveError

HEALTH_POLL_S = 0.05  # the engine is up a moment after it binds: poll often, it costs nothing
ENGINE_KEY_ENV = "VLLM_API_KEY"  # vllm serve's (and the simulator's) key for /v1, from the environment
STOP_WAIT_S = 30.0  # Slurm's KillWait: an engine drains within it


def engine_environ(base: Mapping[str, str], engine_key: str | None) -> dict[str, str]:
    """The engine's environment: ``base`` with the engine key as ``VLLM_API_KEY`` (argv is readable by
    every user of the node, in /proc; the environment only by the owner)."""
    env = dict(base)
    if engine_key:
        env[ENGINE_KEY_ENV] = engine_key
    return env


def free_port() -> int:
    """A port free on this node right now (the engine binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def wait_healthy(
    url: str,
    proc: subprocess.Popen[bytes],
    timeout_s: float,
    model: str | None = None,
    key: str | None = None,
) -> None:
    """Poll ``url/health`` until it answers 200 and then (with ``model``) ``url/v1/models`` until it lists
    ``model`` (with the engine's ``key``): an engine whose health answers before its API serves the model
    is not ready yet. Fails if the engine exits or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HpcserveError(f"the engine exited with status {proc.returncode} before it was healthy")
        if _get(f"{url}/health") is not None and (model is None or model in _models(url, key)):
            return
        time.sleep(HEALTH_POLL_S)
    raise HpcserveError(f"the engine was not ready (/health, then /v1/models) within {timeout_s:g}s")


def _get(url: str, key: str | None = None) -> bytes | None:
    """The body of a 200 answer, or None."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310 (http only)
            return bytes(response.read()) if response.status == 200 else None
    except OSError:
        return None


def _models(url: str, key: str | None) -> set[str]:
    """The model ids ``url/v1/models`` lists (none when it does not answer, or with anything else)."""
    body = _get(f"{url}/v1/models", key)
    try:
        data = json.loads(body or b"{}").get("data", [])
        return {str(m.get("id")) for m in data if isinstance(m, dict)}
    except (ValueError, AttributeError):
        return set()


def engine_argv(spec: Any, host: str, port: int, rank: int = 0, head: str = "") -> list[str]:
    """The engine's command: ``vllm serve ...`` or hpcserve's engine simulator, with this Python.

    A replica over several nodes (pipeline parallel) runs one ``vllm serve`` per node, in vLLM's
    multi-node mode: rank 0 serves the API, the others join it ``--headless``.
    """
    from hpcserve.serving.vllm_cmd import simulator_argv, vllm_serve_argv

    if spec.engine != "vllm":
        return simulator_argv(spec, host, port, python=sys.executable)
    argv = vllm_serve_argv(spec, host, port)
    if spec.nodes_per_replica > 1:
        argv += ["--nnodes", str(spec.nodes_per_replica), "--node-rank", str(rank), "--master-addr", head]
        argv += ["--headless"] if rank else []
    return argv


def job_rank() -> tuple[int, str]:
    """This task's rank in the replica job and the job's first node (where rank 0 runs)."""
    from hpcserve.hostlists import expand

    nodes = expand(os.environ.get("SLURM_JOB_NODELIST", "")) or [socket.gethostname()]
    return int(os.environ.get("SLURM_PROCID", "0")), nodes[0]


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the engine if it runs, then SIGKILL if it outlives ``STOP_WAIT_S``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()


def ignore_time_limit_warning() -> None:
    """Slurm sends USR2 (submitit's ``--signal=USR2@90``, up to a minute early) to every process of the
    step. submitit's handler would end the job at once, and USR2's default action kills the engine (vLLM
    installs no handler), cutting its streams. The service hands a replica over before its limit and
    cancels it when idle, so the warning is only logged here, and the engine, started with USR2 ignored,
    keeps ignoring it (an ignored signal stays ignored across exec)."""

    def note(signum: int, frame: FrameType | None) -> None:
        print("replica: Slurm's time-limit warning (USR2) ignored: the service hands this replica over",
              file=sys.stderr, flush=True)  # fmt: skip

    signal.signal(signal.SIGUSR2, note)


def forward_sigterm(proc: subprocess.Popen[bytes]) -> None:
    """Slurm's SIGTERM (scancel, time limit) goes on to the engine, which drains its requests."""

    def forward(signum: int, frame: FrameType | None) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
