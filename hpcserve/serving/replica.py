"""What a replica job runs on its node (through submitit, as the deployment's owner): stage the weights, start
the engine on a free port, wait for its /health, announce ``host:port`` to the service, pass SIGTERM on for a
graceful drain, and exit with the engine.

The announcement is ``POST /v1/replicas/announce`` on the service's API, authenticated by the replica's own
secret (``Authorization: Replica <secret>``): the service issued it at submit, keeps only its hash, and
handed it over in a 0600 file of the owner in the replica's folder. Over the Unix socket (nodes that share
the login node's filesystem) the kernel also tells the service that the caller is the owner; over TCP the
secret is the proof.

The same file holds the engine key (JSON ``{"secret": ..., "engine_key": ...}``): the engine gets it in its
environment (``VLLM_API_KEY``, read by ``vllm serve`` and by hpcserve's simulator), never in its command
line, and then answers /v1 only to requests that carry it, which only the gateway has. So nobody reaches
the engine around the gateway's keys and limits, and a replica that announces another user's engine gets
401s from it, never its GPUs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcserve.errors import HpcserveError
from hpcserve.serving.engine_proc import (
    engine_argv,
    engine_environ,
    forward_sigterm,
    free_port,
    ignore_time_limit_warning,
    job_rank,
    stop,
)
from hpcserve.serving.phases import StartPhases
from hpcserve.serving.pool_replica import members_from, serve_with_agent
from hpcserve.serving.start_probe import measure_start, process_start_unix, stage

ANNOUNCE_PATH = "/v1/replicas/announce"
SECRET_SCHEME = "Replica"  # noqa: S105 (a scheme, not a secret): Authorization: Replica <secret>
ANNOUNCE_RETRY_S = 1.0  # a service that restarts is back within seconds; the ready timeout bounds the wait


def secret_file_name(index: int) -> str:
    """The replica's secret and engine key, in its deployment's folder (0600, the owner's)."""
    return f"replica-{index}.secret"


@dataclass(frozen=True)
class ReplicaCredentials:
    """What the service hands a replica at submit: the ``secret`` it announces itself with, and the key its
    engine requires on /v1 (None: an engine open to all, as before engine keys)."""

    secret: str = field(repr=False)
    engine_key: str | None = field(default=None, repr=False)

    def encode(self) -> bytes:
        return json.dumps({"secret": self.secret, "engine_key": self.engine_key}).encode()

    @classmethod
    def decode(cls, data: bytes) -> ReplicaCredentials:
        """The file's JSON; a file of plain text is a secret alone (written before engine keys)."""
        text = data.decode().strip()
        if not text.startswith("{"):
            return cls(text)
        raw = json.loads(text)
        return cls(str(raw["secret"]), str(raw["engine_key"]) if raw.get("engine_key") else None)


class ReplicaMain:
    """The callable a replica job runs. Plain data only, so submitit pickles it cheaply; the secret itself
    is not in it, only the name of its file in ``folder``."""

    def __init__(
        self, spec: dict[str, Any], index: int, folder: str, ready_timeout_s: float, secret_name: str,
        service_socket: str | None, service_url: str | None = None,
        members: list[dict[str, Any]] | None = None,
    ) -> None:  # fmt: skip
        self.spec, self.index, self.folder, self.ready_timeout_s = spec, index, folder, ready_timeout_s
        self.secret_name, self.service_socket, self.service_url = secret_name, service_socket, service_url
        self.members = members  # a pool replica: one engine per member spec; ``spec`` is the pool's shape
        self.start_phases: StartPhases | None = None  # set as the job runs: what the announcement reports

    def __call__(self) -> int:
        from hpcserve.serving.spec import DeploymentSpec
        from hpcserve.serving.vllm_cmd import has_sleep_mode

        job_start = process_start_unix()
        spec = DeploymentSpec.model_validate(self.spec)
        spec, staging = stage(spec)
        self.start_phases = StartPhases(staging, job_start=job_start)
        rank, head = job_rank()
        if rank and spec.engine != "vllm":  # the simulator is one process: other nodes only hold theirs
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            signal.sigwait({signal.SIGTERM})
            return 0
        if self.members is not None or has_sleep_mode(spec):  # engines in sleep mode, the agent in front
            return serve_with_agent(self, spec, members_from(self.members))
        host, port = socket.gethostname(), free_port()
        argv = engine_argv(spec, "0.0.0.0", port, rank, head)  # noqa: S104 (the gateway connects)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # inherited: the engine ignores it too (see below)
        proc = subprocess.Popen(argv, env=engine_environ(os.environ, self.credentials().engine_key))
        forward_sigterm(proc)
        ignore_time_limit_warning()
        if rank:  # a headless vLLM rank: no API of its own
            self.report_telemetry(spec.name)
            return proc.wait()
        try:
            key = self.credentials().engine_key
            self.start_phases = measure_start(f"http://{host}:{port}", proc, self.ready_timeout_s,
                                              spec.served_model_name, key, self.start_phases)  # fmt: skip
            self.announce(spec.name, host, port, time.monotonic() + self.ready_timeout_s)
        except BaseException:
            stop(proc)
            raise
        self.report_telemetry(spec.name)
        return proc.wait()

    def report_telemetry(self, deployment: str) -> None:
        """This node's GPUs to the service in a thread beside the engine, with the replica's secret
        (``hpcserve.telemetry.reporter``: never fails the replica; off with HPCSERVE_TELEMETRY=0)."""
        from hpcserve.telemetry.batching import ReplicaIdentity
        from hpcserve.telemetry.reporter import start_reporter

        identity = ReplicaIdentity(deployment, self.index, self.credentials().secret)
        start_reporter(os.environ.get("SLURM_JOB_ID", ""), self.client, identity)

    def announce(
        self, deployment: str, host: str, port: int, deadline: float, models: dict[str, int] | None = None
    ) -> None:
        """``host:port`` to the service, with this job's id and the secret (and, from a replica with sleep
        mode, ``models``: its engines' ports, ``host:port`` being its agent's); retried while the service
        cannot be reached (it may be restarting), until ``deadline``. A refusal is final."""
        from hpcserve.service.client import ServiceUnavailable

        secret = self.credentials().secret
        body = {"deployment": deployment, "index": self.index, "job_id": os.environ.get("SLURM_JOB_ID", ""),
                "host": host, "port": port}  # fmt: skip
        if models is not None:
            body["models"] = models
        if self.start_phases is not None:  # how this start went (hpcserve.serving.phases)
            body["phases"] = self.start_phases.as_json()
        headers = {"Authorization": f"{SECRET_SCHEME} {secret}"}
        while True:
            try:
                self.client().call("POST", ANNOUNCE_PATH, body, headers=headers)
                return
            except ServiceUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(ANNOUNCE_RETRY_S)

    def credentials(self) -> ReplicaCredentials:
        """The secret and engine key the service left in this replica's 0600 file."""
        return ReplicaCredentials.decode((Path(self.folder) / self.secret_name).read_bytes())

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
