"""What a replica job runs on its node (through submitit): stage the weights, start the engine on a free
port, wait for its /health, announce ``host:port``, pass SIGTERM on for a graceful drain, and exit with
the engine.

The announcement is a small JSON file in the deployment's folder under ``serving.replica_dir`` (a shared
filesystem, as submitit itself needs): the service's reconciler reads it and marks the replica ready.
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
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from hpcserve.errors import HpcserveError

HEALTH_POLL_S = 0.05  # the engine is up a moment after it binds: poll often, it costs nothing


@dataclass(frozen=True, slots=True)
class Announcement:
    deployment: str
    index: int
    job_id: str
    host: str
    port: int
    url: str
    ready_at: str  # ISO 8601, UTC


def announcement_path(replica_dir: Path, deployment: str, index: int) -> Path:
    return replica_dir / deployment / f"replica-{index}.json"


def read_announcement(path: Path) -> Announcement | None:
    """The replica's announcement, or None while there is none (or it is half written: never, it is
    renamed into place)."""
    try:
        return Announcement(**json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None


def free_port() -> int:
    """A port free on this node right now (the engine binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Poll ``url/health`` until it answers 200; fail if the engine exits or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HpcserveError(f"the engine exited with status {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:  # noqa: S310 (http only)
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(HEALTH_POLL_S)
    raise HpcserveError(f"the engine was not healthy within {timeout_s:g}s")


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


class ReplicaMain:
    """The callable a replica job runs. Plain data only, so submitit pickles it cheaply."""

    def __init__(self, spec: dict[str, Any], index: int, replica_dir: str, ready_timeout_s: float) -> None:
        self.spec, self.index = spec, index
        self.replica_dir, self.ready_timeout_s = replica_dir, ready_timeout_s

    def __call__(self) -> int:
        from hpcserve.serving.spec import DeploymentSpec

        spec = DeploymentSpec.model_validate(self.spec)
        spec = _staged(spec)
        rank, head = job_rank()
        if rank and spec.engine != "vllm":  # the simulator is one process: other nodes only hold theirs
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            signal.sigwait({signal.SIGTERM})
            return 0
        host, port = socket.gethostname(), free_port()
        url = f"http://{host}:{port}"
        argv = engine_argv(spec, "0.0.0.0", port, rank, head)  # noqa: S104 (the gateway connects)
        proc = subprocess.Popen(argv)
        _forward_sigterm(proc)
        if rank:  # a headless vLLM rank: no API of its own
            return proc.wait()
        wait_healthy(url, proc, self.ready_timeout_s)
        self._announce(spec.name, host, port, url)
        return proc.wait()

    def _announce(self, deployment: str, host: str, port: int, url: str) -> None:
        job_id = os.environ.get("SLURM_JOB_ID", "")
        path = announcement_path(Path(self.replica_dir), deployment, self.index)
        path.parent.mkdir(parents=True, exist_ok=True)
        note = Announcement(deployment, self.index, job_id, host, port, url, datetime.now(UTC).isoformat())
        tmp = path.with_suffix(f".{job_id or os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(note)))
        tmp.replace(path)


def _staged(spec: Any) -> Any:
    """With a warm tier, copy the weights there first and serve them from node-local disk."""
    if not spec.warm_tier or not Path(spec.model).is_dir():
        return spec
    from hpcserve.serving.staging import stage_weights

    warm = Path(str(spec.warm_tier).format(node=socket.gethostname())) / Path(spec.model).name
    stage_weights(Path(spec.model), warm)
    return spec.model_copy(update={"model": str(warm)})


def _forward_sigterm(proc: subprocess.Popen[bytes]) -> None:
    """Slurm's SIGTERM (scancel, time limit) goes on to the engine, which drains its requests."""

    def forward(signum: int, frame: FrameType | None) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
