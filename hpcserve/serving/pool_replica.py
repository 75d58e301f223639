"""A replica job with sleep mode: its engines, one at a time, then the replica agent in front of them.

A deployment with sleep mode (``warm_after_s`` set, or in a pool) runs its replicas this way, from
``ReplicaMain`` (hpcserve.serving.replica):
- a plain sleep-mode deployment: one engine, the deployment's own, and the agent;
- a pool replica (``members`` given; the spec is the pool's shape): one engine per member, each on
  ``--gpu-memory-utilization`` = the job's GPU share (``gpu_fraction``, else 0.9) / ``pool_max_awake``
  unless the member sets it, and at most ``pool_max_awake`` of them awake at once.

Every engine starts with ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1`` in its environment (vLLM's
dev-server mode mounts /sleep, /wake_up, /is_sleeping only then; the engine simulator does the same). They
start ONE AT A TIME, as they must on real GPUs (each profiles the free memory alone), and once
``max_awake`` are awake, one is put to sleep before the next starts. When all are healthy the agent starts
on a free port and the replica announces the agent's port and ``models`` = {served model name: engine
port}. SIGTERM goes on to every engine (each drains); the job exits when they have exited.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from hpcserve.errors import HpcserveError
from hpcserve.serving.agent import ReplicaAgent, serve
from hpcserve.serving.agent_rules import member_gpu_utilization
from hpcserve.serving.engine_proc import (
    STOP_WAIT_S,
    engine_argv,
    engine_environ,
    free_port,
    ignore_time_limit_warning,
    wait_healthy,
)
from hpcserve.serving.phases import Staging, StartPhases
from hpcserve.serving.spec import DeploymentSpec, Engine
from hpcserve.serving.start_probe import measure_start, stage
from hpcserve.serving.vllm_cmd import DEV_MODE_ENV

GPU_UTILIZATION = "gpu-memory-utilization"
EXIT_POLL_S = 0.2


class ReplicaJob(Protocol):
    """What this module needs of the replica job that runs it (``hpcserve.serving.replica.ReplicaMain``,
    which calls ``serve_with_agent``): its ready timeout, its credentials, the start it measures, and
    its announcement and telemetry."""

    ready_timeout_s: float
    start_phases: StartPhases | None

    def credentials(self) -> Any: ...

    def announce(
        self, deployment: str, host: str, port: int, deadline: float, models: dict[str, int] | None = None
    ) -> None: ...

    def report_telemetry(self, deployment: str) -> None: ...


def engine_specs(shape: DeploymentSpec, members: Sequence[DeploymentSpec] | None) -> list[DeploymentSpec]:
    """The spec of each engine the replica runs: the deployment's own, or one per pool member."""
    if members is None:
        return [shape]
    if not members:
        raise HpcserveError(f"pool {shape.name}: no members to serve (fix: add a deployment with --pool)")
    names = [m.served_model_name for m in members]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise HpcserveError(f"pool {shape.name}: served model names {', '.join(twice)} appear twice")
    return [member_engine_spec(shape, m) for m in members]


def member_engine_spec(shape: DeploymentSpec, member: DeploymentSpec) -> DeploymentSpec:
    """A member's engine in the pool's replica: the pool's engine and GPUs, the member's model and
    engine args, its memory share of the GPUs unless it sets one, and sleep mode."""
    args = dict(member.engine_args)
    if GPU_UTILIZATION not in args:  # the engine simulator takes it too, as vLLM does
        args[GPU_UTILIZATION] = member_gpu_utilization(shape.gpu_fraction, shape.pool_max_awake)
    simulator = member.simulator if shape.engine is Engine.SIMULATOR else None
    update = {"engine": shape.engine, "gpus_per_replica": shape.gpus_per_replica, "engine_args": args,
              "nodes_per_replica": shape.nodes_per_replica, "pool": member.pool or shape.name,
              "simulator": simulator, "gpu_fraction": None, "mig_profile": None}  # fmt: skip
    return member.model_copy(update=update)


def max_awake(shape: DeploymentSpec, members: Sequence[DeploymentSpec] | None) -> int:
    """Engines awake at once: the pool's ``pool_max_awake``; a plain deployment's one engine."""
    return shape.pool_max_awake if members is not None else 1


def sleep_mode_environ(base: Mapping[str, str]) -> dict[str, str]:
    """The engine's environment with vLLM's dev-server mode on (its sleep endpoints mounted)."""
    return {**base, DEV_MODE_ENV: "1"}


class EngineProcesses:
    """The replica's engine processes. Each gets SIGTERM at most once: an engine draining after the first
    (Slurm's, forwarded) would die of a second one once its handler is gone, and exit -15 instead of 0."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self._signalled: set[int] = set()

    def start(self, argv: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        self.procs.append(subprocess.Popen(argv, env=env))
        return self.procs[-1]

    def terminate(self) -> None:
        """SIGTERM to every engine still running that has not had one (they drain, then exit)."""
        for proc in list(self.procs):
            if proc.poll() is None and proc.pid not in self._signalled:
                self._signalled.add(proc.pid)
                proc.send_signal(signal.SIGTERM)

    def running(self) -> bool:
        """Whether every engine still runs (the job ends with the first that exits)."""
        return all(proc.poll() is None for proc in self.procs)

    def stop(self) -> int:
        """Terminate, wait (killing what outlives ``STOP_WAIT_S``), and return the job's exit status: the
        first engine's nonzero one (128 + N for a signal N), else 0."""
        self.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        codes = [code if code >= 0 else 128 - code for code in (p.returncode for p in self.procs)]
        return next((code for code in codes if code), 0)


def serve_with_agent(main: ReplicaJob, shape: DeploymentSpec, members: list[DeploymentSpec] | None) -> int:
    """Run the replica's engines and its agent until the engines exit; their exit status (the first
    nonzero one, else 0)."""
    if shape.engine is Engine.VLLM and shape.nodes_per_replica > 1:
        raise HpcserveError(
            f"{shape.name}: sleep mode runs on one node per replica (fix: nodes_per_replica: 1)"
        )
    engines = EngineProcesses()
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # ignored by the engines too, while they start
    signal.signal(signal.SIGTERM, lambda signum, frame: engines.terminate())  # Slurm's: on to the engines
    return asyncio.run(_serve(main, shape, members, engines))


async def _serve(
    main: ReplicaJob, shape: DeploymentSpec, members: list[DeploymentSpec] | None, engines: EngineProcesses
) -> int:
    key = main.credentials().engine_key
    deadline = time.monotonic() + main.ready_timeout_s
    agent = ReplicaAgent(max_awake(shape, members), key=key)
    await agent.open()
    runner = None
    try:
        for spec in engine_specs(shape, members):
            await agent.make_room()
            staged = _staged(main, spec, members)
            port = await asyncio.to_thread(_start_engine, main, staged, key, deadline, engines)
            await agent.add_engine(spec.served_model_name, port)
        ignore_time_limit_warning()  # only now: a handler (unlike SIG_IGN) is not inherited across exec
        runner, port = await serve(agent, "0.0.0.0")  # noqa: S104 (the gateway connects)
        host = socket.gethostname()
        await asyncio.to_thread(main.announce, shape.name, host, port, deadline, models=agent.models)
        main.report_telemetry(shape.name)
        while engines.running():
            await asyncio.sleep(EXIT_POLL_S)
        return await asyncio.to_thread(engines.stop)
    except BaseException:
        await asyncio.to_thread(engines.stop)
        raise
    finally:
        if runner is not None:
            await runner.cleanup()
        await agent.close()


def _staged(main: ReplicaJob, spec: DeploymentSpec, members: list[DeploymentSpec] | None) -> DeploymentSpec:
    """A pool member's weights staged like a plain replica's (ReplicaMain stages a plain deployment's),
    its staging added to the replica's phases."""
    if members is None:
        return spec
    found: tuple[DeploymentSpec, Staging] = stage(spec)
    if main.start_phases is not None:
        main.start_phases = main.start_phases.with_staging(found[1])
    return found[0]


def _start_engine(
    main: ReplicaJob, spec: DeploymentSpec, key: str | None, deadline: float, engines: EngineProcesses
) -> int:
    """Start one engine on a free port and wait until it serves; its port. The first engine's start is
    measured for the replica's phases (hpcserve.serving.phases), as a plain replica's engine is."""
    port = free_port()
    argv = engine_argv(spec, "0.0.0.0", port)  # noqa: S104 (the gateway connects)
    proc = engines.start(argv, sleep_mode_environ(engine_environ(os.environ, key)))
    url, left, name = f"http://127.0.0.1:{port}", deadline - time.monotonic(), spec.served_model_name
    if len(engines.procs) == 1 and main.start_phases is not None:
        main.start_phases = measure_start(url, proc, left, name, key, main.start_phases)
    else:
        wait_healthy(url, proc, left, name, key)
    return port


def members_from(raw: list[dict[str, Any]] | None) -> list[DeploymentSpec] | None:
    """The member specs ``ReplicaMain`` was given (plain dicts, as pickled), validated."""
    return None if raw is None else [DeploymentSpec.model_validate(m) for m in raw]
