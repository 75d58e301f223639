"""hpcserve's engine SIMULATOR: an aiohttp server that speaks vLLM's OpenAI-compatible HTTP API and metric
names, with a latency model instead of a GPU (``enginesim.core``). It is not vLLM and says so: every
response carries ``x-hpcserve-engine: simulator``, /v1/models says ``owned_by: hpcserve-engine-simulator``,
and the log lines name it.

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (streamed as SSE, or not),
``GET /v1/models``, ``GET /health`` (503 until ``startup_delay_s`` has passed and while draining, then 200),
``GET /metrics`` (Prometheus text, see ``hpcserve.enginesim.metrics``). In ``dev_mode`` (``run`` takes it from
``VLLM_SERVER_DEV_MODE``, as vLLM does), also vLLM's sleep-mode endpoints ``/sleep``, ``/wake_up`` and
``/is_sleeping``, which work with ``enable_sleep_mode`` (see ``hpcserve.enginesim.sleep``).

With an API key (``SimConfig.api_key``; ``run`` takes it from ``VLLM_API_KEY``, as ``vllm serve`` does, so
it is never in the command line) every /v1 request without ``Authorization: Bearer <key>`` gets 401;
/health and /metrics stay open. Without one, nothing is checked.

SIGTERM (what Slurm sends a replica it cancels) drains: new requests get 503, requests in flight finish,
for up to ``drain_timeout_s``, then the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import msgspec
from aiohttp import web

from hpcserve.enginesim import openai as api
from hpcserve.enginesim import sleep as sleep_mode
from hpcserve.enginesim.core import EngineFullError, Scheduler, Seq, SimConfig
from hpcserve.enginesim.metrics import SimMetrics

__all__ = ["SimConfig", "SimEngine", "SimServer", "make_app", "run", "start"]

log = logging.getLogger("hpcserve.engine_sim")
ENGINE_HEADER = ("x-hpcserve-engine", "simulator")
OWNED_BY = "hpcserve-engine-simulator"
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
KEY_ENV = "VLLM_API_KEY"  # where vllm serve (and this simulator's CLI) read the key /v1 requires
DEV_MODE_ENV = "VLLM_SERVER_DEV_MODE"  # "1": vLLM mounts its dev endpoints (the sleep-mode ones among them)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class SimEngine:
    """The per-app state: scheduler, metrics, readiness, draining and the count of requests in flight."""

    def __init__(self, config: SimConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config, self.clock = config, clock
        self.metrics = SimMetrics(config.name)
        self.scheduler = Scheduler(config, self.metrics, clock)
        self.ready_at = float("inf")
        self.draining = False
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def ready(self) -> bool:
        return not self.draining and self.clock() >= self.ready_at

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        self.inflight += 1
        self.idle.clear()
        try:
            yield
        finally:
            self.inflight -= 1
            if not self.inflight:
                self.idle.set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests and wait up to ``timeout`` s for those in flight; True if all finished."""
        self.draining = True
        log.info(
            "engine simulator draining: %d requests in flight, waiting up to %.0f s", self.inflight, timeout
        )
        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
        except TimeoutError:
            log.warning("engine simulator drain timed out with %d requests in flight", self.inflight)
            return False
        return True


ENGINE = web.AppKey("hpcserve_engine_sim", SimEngine)


def make_app(config: SimConfig, clock: Callable[[], float] = time.monotonic) -> web.Application:
    """The simulator as an aiohttp app; the scheduler task runs while the app does."""
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[_check_key])
    app[ENGINE] = SimEngine(config, clock)
    app.cleanup_ctx.append(_engine_task)
    app.on_response_prepare.append(_mark_simulator)
    app.router.add_post("/v1/completions", _generate(chat=False))
    app.router.add_post("/v1/chat/completions", _generate(chat=True))
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    if config.dev_mode:
        engine = app[ENGINE]
        sleep_mode.add_routes(app, sleep_mode.SleepControl(config, engine.scheduler, engine.metrics))
    return app


async def _engine_task(app: web.Application) -> AsyncIterator[None]:
    engine = app[ENGINE]
    delay = engine.config.startup_delay_s
    engine.ready_at = engine.clock() + delay
    task = asyncio.create_task(engine.scheduler.run(), name="engine-sim-scheduler")
    loop = asyncio.get_running_loop()
    announce = loop.call_later(delay, log.info, "hpcserve engine simulator ready") if delay else None
    yield
    if announce:
        announce.cancel()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@web.middleware
async def _check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
    """401 for a /v1 request without the engine's key (when it has one), before any work is done."""
    key = request.app[ENGINE].config.api_key
    if api.authorized(key, request.path, request.headers.get("Authorization")):
        return await handler(request)
    response = _error(api.UNAUTHORIZED)
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


async def _mark_simulator(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers[ENGINE_HEADER[0]] = ENGINE_HEADER[1]


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(body), status=status, content_type="application/json")


def _error(exc: api.ApiError) -> web.Response:
    return _json(exc.body(), exc.status)


def _unavailable(engine: SimEngine) -> api.ApiError:
    why = "draining after SIGTERM" if engine.draining else "still starting (simulated model load)"
    return api.ApiError(503, f"the hpcserve engine simulator is {why}", "ServiceUnavailableError")


def _generate(*, chat: bool) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        engine = request.app[ENGINE]
        if not engine.ready():
            return _error(_unavailable(engine))
        with engine.request():
            try:
                job = api.parse_job(await request.read(), engine.config, chat=chat)
                seq = _submit(engine, job)
            except api.ApiError as exc:
                return _error(exc)
            try:
                return await (_stream(request, job, seq) if job.stream else _whole(job, seq))
            finally:
                engine.scheduler.abandon(seq)

    return handler


def _submit(engine: SimEngine, job: api.Job) -> Seq:
    seq = Seq(job.prompt_tokens, job.limit, job.finish_reason, stream=job.stream, arrival=engine.clock())
    try:
        engine.scheduler.submit(seq)
    except EngineFullError:
        raise api.ApiError(
            503,
            f"the engine simulator's queue is full ({engine.config.max_waiting} waiting)",
            "ServiceUnavailableError",
        ) from None
    return seq


def _ended(job: api.Job, seq: Seq) -> api.Job:
    """The job with the reason its request ended ("abort" when a sleep aborted it)."""
    return job if seq.finish_reason == job.finish_reason else replace(job, finish_reason=seq.finish_reason)


async def _whole(job: api.Job, seq: Seq) -> web.Response:
    await seq.event.wait()
    return _json(api.response(_ended(job, seq), seq.generated))


async def _stream(request: web.Request, job: api.Job, seq: Seq) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    sent, finished = 0, False
    while not finished:
        await seq.event.wait()
        seq.event.clear()
        finished = seq.finished
        parts = [api.chunk(job, None, role=True)] if job.chat and sent == 0 else []
        parts += [api.chunk(job, job.token(i)) for i in range(sent, seq.generated)]
        sent = seq.generated
        if finished:
            parts += _closing(_ended(job, seq), sent)
        try:
            await response.write(b"".join(parts))
        except ConnectionResetError:  # the client went away; the caller drops the request
            return response
    await response.write_eof()
    return response


def _closing(job: api.Job, generated: int) -> list[bytes]:
    usage = [api.usage_chunk(job, generated)] if job.include_usage else []
    return [api.chunk(job, None, job.finish_reason), *usage, api.DONE]


async def _models(request: web.Request) -> web.Response:
    config = request.app[ENGINE].config
    model = {
        "id": config.name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": OWNED_BY,
        "root": config.model,
        "parent": None,
        "max_model_len": config.max_model_len,
    }
    return _json({"object": "list", "data": [model]})


async def _health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    return web.Response(status=200) if engine.ready() else _error(_unavailable(engine))


async def _metrics(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = engine.metrics.render(engine.scheduler.load())
    return web.Response(body=body, headers={"Content-Type": engine.metrics.content_type})


@dataclass
class SimServer:
    """A simulator listening on a socket, in this process (tests, demos, benchmarks)."""

    app: web.Application
    runner: web.AppRunner
    port: int

    @property
    def engine(self) -> SimEngine:
        return self.app[ENGINE]

    @property
    def url(self) -> str:
        host = self.engine.config.host
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}"  # noqa: S104

    async def close(self) -> None:
        await self.runner.cleanup()


async def start(config: SimConfig, clock: Callable[[], float] = time.monotonic) -> SimServer:
    """Bind at once (``port`` 0 picks a free one) and start serving; /health turns 200 after the delay."""
    app = make_app(config, clock)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    port = int(runner.addresses[0][1])
    log.info(
        "hpcserve engine SIMULATOR (not vLLM) serving %r on %s:%d; ready in %.1f s; /v1 %s",
        config.name,
        config.host,
        port,
        config.startup_delay_s,
        "needs its API key" if config.api_key else "open (no API key)",
    )
    return SimServer(app, runner, port)


def run(config: SimConfig) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return (the CLI exits 0). Without a key in ``config``,
    the key is ``$VLLM_API_KEY`` when set."""
    if config.api_key is None and os.environ.get(KEY_ENV):
        config = dataclasses.replace(config, api_key=os.environ[KEY_ENV])
    if os.environ.get(DEV_MODE_ENV) == "1":
        config = dataclasses.replace(config, dev_mode=True)
    asyncio.run(_serve_until_signal(config))


async def _serve_until_signal(config: SimConfig) -> None:
    server = await start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    drained = await server.engine.drain(config.drain_timeout_s)
    await server.close()
    log.info("hpcserve engine simulator stopped (%s)", "drained" if drained else "drain timed out")
