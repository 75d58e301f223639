"""What a replica job runs on its node (through submitit, as the deployment's owner): stage the weights, start
the engine on a free port, wait for its /health, announce ``host:port`` to the service, pass SIGTERM on for a
graceful drain, and exit with the engine.

The announcement is ``POST /v1/replicas/announce`` on the service's API, authenticated by the replica's own
secret (``Authorization: Replica <secret>``): the service issued it at submit, keeps only its hash, and
handed it over in a 0600 file of the owner in the replica's folder. Over the Unix socket (nodes that share
the login node's filesystem) the kernel also tells the service that the caller is the owner; over TCP the
secret is the proof.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

from hpcserve.errors import HpcserveError

HEALTH_POLL_S = 0.05  # the engine is up a moment after it binds: poll often, it costs nothing
ANNOUNCE_PATH = "/v1/replicas/announce"
SECRET_SCHEME = "Replica"  # noqa: S105 (a scheme, not a secret): Authorization: Replica <secret>
ANNOUNCE_RETRY_S = 1.0  # a service that restarts is back within seconds; the ready timeout bounds the wait


def secret_file_name(index: int) -> str:
    """The replica's secret, in its deployment's folder (0600, the owner's)."""
    return f"replica-{index}.secret"


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
    """The callable a replica job runs. Plain data only, so submitit pickles it cheaply; the secret itself
    is not in it, only the name of its file in ``folder``."""

    def __init__(
        self, spec: dict[str, Any], index: int, folder: str, ready_timeout_s: float, secret_name: str,
        service_socket: str | None, service_url: str | None = None,
    ) -> None:  # fmt: skip
        self.spec, self.index, self.folder, self.ready_timeout_s = spec, index, folder, ready_timeout_s
        self.secret_name, self.service_socket, self.service_url = secret_name, service_socket, service_url

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
        argv = engine_argv(spec, "0.0.0.0", port, rank, head)  # noqa: S104 (the gateway connects)
        proc = subprocess.Popen(argv)
        _forward_sigterm(proc)
        if rank:  # a headless vLLM rank: no API of its own
            return proc.wait()
        try:
            wait_healthy(f"http://{host}:{port}", proc, self.ready_timeout_s)
            self.announce(spec.name, host, port, time.monotonic() + self.ready_timeout_s)
        except BaseException:
            _stop(proc)
            raise
        return proc.wait()

    def announce(self, deployment: str, host: str, port: int, deadline: float) -> None:
        """``host:port`` to the service, with this job's id and the secret; retried while the service
        cannot be reached (it may be restarting), until ``deadline``. A refusal is final."""
        from hpcserve.service.client import ServiceUnavailable

        secret = (Path(self.folder) / self.secret_name).read_text().strip()
        body = {"deployment": deployment, "index": self.index, "job_id": os.environ.get("SLURM_JOB_ID", ""),
                "host": host, "port": port}  # fmt: skip
        headers = {"Authorization": f"{SECRET_SCHEME} {secret}"}
        while True:
            try:
                self.client().call("POST", ANNOUNCE_PATH, body, headers=headers)
                return
            except ServiceUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(ANNOUNCE_RETRY_S)

    def client(self) -> Any:
        """The service's API: its Unix socket when this node sees it, else its TCP address."""
        from hpcserve.service.client import ServiceClient

        if self.service_socket and (Path(self.service_socket).exists() or not self.service_url):
            return ServiceClient(Path(self.service_socket))
        if self.service_url:
            return ServiceClient(None, self.service_url)
        raise HpcserveError(
            "the replica has no way to reach the service (fix: set service.socket or service.url)"
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


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
