"""The replica agent: a small HTTP server in a sleep-mode replica job that wakes and sleeps its engines.

A replica of a deployment with sleep mode (warm tier, or a model pool) runs one engine per model, each
started with ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1``, and this agent beside them (in the
replica job's own process, as the deployment's owner). The replica announces the agent's port, so the
replica's URL is the agent's; the gateway asks it to wake a model before it sends that model a request.

API (every call needs ``Authorization: Bearer <engine key>`` when the replica has one; 401 otherwise):
- ``GET /hpcserve/engines`` -> ``{"max_awake": K, "engines": {NAME: {"port", "state", "last_used"}}}``;
- ``POST /hpcserve/wake?model=NAME`` -> blocks until NAME is awake, first putting to sleep the awake engine
  used least recently when K are awake; ``{"model", "woke", "slept", "wake_s"}``; 404 for an unknown model;
- ``POST /hpcserve/sleep?model=NAME|all`` -> ``{"slept": [...]}`` once they are asleep (idempotent).

Wakes and sleeps are serialized by one lock, so never more than K engines hold GPU memory, and an engine
is reported ``awake`` only after its ``/wake_up`` answered and its ``/is_sleeping`` said false. Sleeps use
vLLM's ``POST /sleep?level=1&mode=wait`` (requests in flight finish first; the weights go to host RAM).
Every ``POLL_S`` the agent reads each engine's ``/metrics`` (not while it wakes or sleeps): requests
running or waiting on an awake engine count as a use (``last_used``); an engine asleep with requests
waiting (sent to it as it went to sleep) is woken like any other, so they do not wait for ever. The
decisions are pure, in ``hpcserve.serving.agent_rules``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

import aiohttp
from aiohttp import web

from hpcserve.serving.agent_rules import (
    EngineState,
    EngineView,
    Seen,
    UnknownModel,
    engines_body,
    make_room,
    seen,
    sleep_targets,
    victims,
    wake_body,
)
from hpcserve.serving.engine_stats import EngineMetricsError, parse_engine_metrics

log = logging.getLogger("hpcserve.agent")
POLL_S = 1.0  # how often awake engines' /metrics are read for last_used
SCRAPE_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 5.0
SLEEP_QUERY = {"level": "1", "mode": "wait"}
SLEEP_FIX = "--enable-sleep-mode and VLLM_SERVER_DEV_MODE=1 in its environment"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class EngineCallError(Exception):
    """An engine's /sleep, /wake_up or /is_sleeping failed: 502 with this one-line message."""


class ReplicaAgent:
    """The engines of one replica and their sleep states, by served model name (``add_engine`` as the
    replica starts each, on ``host``: this node); ``key`` is the engine key the agent's callers must
    present (and that it sends the engines); ``clock`` gives unix seconds (``last_used``). A client that
    goes away mid-wake does not cut the wake short (aiohttp lets the handler finish)."""

    def __init__(
        self,
        max_awake: int,
        key: str | None = None,
        host: str = "127.0.0.1",
        clock: Callable[[], float] = time.time,
        poll_s: float = POLL_S,
    ) -> None:
        self.max_awake, self.key, self.host, self.clock, self.poll_s = max_awake, key, host, clock, poll_s
        self.engines: dict[str, EngineView] = {}
        self.lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._poller: asyncio.Task[None] | None = None
        self._parked: dict[str, asyncio.Task[None]] = {}  # wakes for requests parked on sleeping engines

    # -- lifecycle --------------------------------------------------------------------------------

    async def open(self) -> None:
        """The HTTP client to the engines and the /metrics poller."""
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)
            self._session = aiohttp.ClientSession(timeout=timeout, headers=self._auth())
            self._poller = asyncio.create_task(self._poll(), name="agent-metrics-poll")

    async def close(self) -> None:
        parked = list(self._parked.values())
        for task in parked:
            task.cancel()
        await asyncio.gather(*parked, return_exceptions=True)
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._session is not None:
            await self._session.close()
        self._session = self._poller = None

    async def add_engine(self, name: str, port: int) -> None:
        """Track a healthy engine; its state is what its /is_sleeping says."""
        sleeping = await self._is_sleeping(port)
        state = EngineState.ASLEEP if sleeping else EngineState.AWAKE
        self.engines[name] = EngineView(port, state, self.clock())

    # -- the API's operations ---------------------------------------------------------------------

    async def wake(self, name: str) -> dict[str, Any]:
        """Wake ``name`` (first putting the LRU awake engine to sleep when ``max_awake`` are awake)."""
        async with self.lock:
            slept = victims(self.engines, self.max_awake, name)
            for other in slept:
                await self._sleep_one(other)
            if self.engines[name].state is EngineState.AWAKE:
                self._touch(name)
                return wake_body(name, False, slept, 0.0)
            started = time.monotonic()
            await self._wake_one(name)
            return wake_body(name, True, slept, time.monotonic() - started)

    async def sleep(self, which: str) -> list[str]:
        """Put ``which`` (a model name, or ``all``) to sleep; the names that were put to sleep."""
        async with self.lock:
            names = sleep_targets(self.engines, which)
            done = await asyncio.gather(*(self._sleep_one(name) for name in names), return_exceptions=True)
            failed = [error for error in done if isinstance(error, BaseException)]
            if failed:
                raise failed[0]
            return names

    async def make_room(self) -> list[str]:
        """Sleep engines (LRU) until one more fits: the replica calls this before it starts the next."""
        async with self.lock:
            names = make_room(self.engines, self.max_awake)
            for name in names:
                await self._sleep_one(name)
            return names

    def body(self) -> dict[str, Any]:
        return engines_body(self.max_awake, self.engines)

    @property
    def models(self) -> dict[str, int]:
        """``{served model name: engine port}``: what the replica announces."""
        return {name: e.port for name, e in self.engines.items()}

    # -- engine calls -----------------------------------------------------------------------------

    async def _sleep_one(self, name: str) -> None:
        self._set(name, EngineState.SLEEPING)
        try:
            await self._post(name, "/sleep", SLEEP_QUERY)
        finally:
            await self._settle(name)
        if self.engines[name].state is not EngineState.ASLEEP:
            raise EngineCallError(f"engine {name!r} still says it is awake after /sleep")
        log.info("agent: %s asleep", name)

    async def _wake_one(self, name: str) -> None:
        self._set(name, EngineState.WAKING)
        try:
            await self._post(name, "/wake_up", {})
        finally:
            await self._settle(name)
        if self.engines[name].state is not EngineState.AWAKE:
            raise EngineCallError(f"engine {name!r} still says it is asleep after /wake_up")
        self._touch(name)
        log.info("agent: %s awake", name)

    async def _settle(self, name: str) -> None:
        """The engine's state from its own /is_sleeping (asleep when it cannot tell: never awake unseen)."""
        try:
            sleeping = await self._is_sleeping(self.engines[name].port)
        except EngineCallError:
            sleeping = True
        self._set(name, EngineState.ASLEEP if sleeping else EngineState.AWAKE)

    async def _post(self, name: str, path: str, query: Mapping[str, str]) -> None:
        url = f"http://{self.host}:{self.engines[name].port}{path}"
        try:
            async with self._client().post(url, params=query) as response:
                if response.status != 200:
                    text = " ".join((await response.text()).split())[:200]
                    raise EngineCallError(f"engine {name!r}: {path} answered {response.status}: {text}")
        except aiohttp.ClientError as exc:
            raise EngineCallError(f"engine {name!r}: {path} failed: {exc}") from exc

    async def _is_sleeping(self, port: int) -> bool:
        url = f"http://{self.host}:{port}/is_sleeping"
        try:
            async with self._client().get(url) as response:
                if response.status != 200:
                    raise EngineCallError(f"engine on port {port}: /is_sleeping answered {response.status} "
                                          f"(fix: start it with {SLEEP_FIX})")  # fmt: skip
                return bool((await response.json()).get("is_sleeping"))
        except (aiohttp.ClientError, ValueError) as exc:
            raise EngineCallError(f"engine on port {port}: /is_sleeping failed: {exc}") from exc

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            steady = [
                n for n, e in self.engines.items() if e.state in (EngineState.AWAKE, EngineState.ASLEEP)
            ]
            try:
                await asyncio.gather(*(self._scrape(name) for name in steady))
            except Exception:  # never let one bad scrape end the polling
                log.exception("agent: reading the engines' /metrics failed")

    async def _scrape(self, name: str) -> None:
        """Mark ``name`` used when its /metrics shows requests running or waiting, and wake it when it is
        asleep with requests parked (errors are skipped)."""
        url = f"http://{self.host}:{self.engines[name].port}/metrics"
        try:
            timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)
            async with self._client().get(url, timeout=timeout) as response:
                stats = parse_engine_metrics(await response.text())
        except (aiohttp.ClientError, TimeoutError, EngineMetricsError):
            return
        found = seen(self.engines[name].state, stats.running, stats.waiting)
        if found is Seen.USED:
            self._touch(name)
        elif found is Seen.PARKED and name not in self._parked:
            self._parked[name] = asyncio.create_task(self._wake_parked(name), name=f"agent-wake-{name}")

    async def _wake_parked(self, name: str) -> None:
        try:
            log.info("agent: %s is asleep with requests parked: waking it", name)
            await self.wake(name)
        except EngineCallError as exc:
            log.warning("agent: waking %s for its parked requests failed: %s", name, exc)
        finally:
            self._parked.pop(name, None)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ReplicaAgent.open() was not called")
        return self._session

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def _set(self, name: str, state: EngineState) -> None:
        self.engines[name] = replace(self.engines[name], state=state)

    def _touch(self, name: str) -> None:
        self.engines[name] = replace(self.engines[name], last_used=self.clock())


# -- the HTTP server -------------------------------------------------------------------------------

AGENT = web.AppKey("hpcserve_replica_agent", ReplicaAgent)


def make_app(agent: ReplicaAgent) -> web.Application:
    """The agent's aiohttp app; the agent's client and poller run while the app does."""
    app = web.Application(middlewares=[_check_key])
    app[AGENT] = agent
    app.cleanup_ctx.append(_agent_ctx)
    app.router.add_get("/hpcserve/engines", _engines)
    app.router.add_post("/hpcserve/wake", _wake)
    app.router.add_post("/hpcserve/sleep", _sleep)
    return app


async def _agent_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[AGENT].open()
    yield
    await app[AGENT].close()


def authorized(key: str | None, header: str | None) -> bool:
    """Whether ``header`` is ``Bearer <key>`` (compared in constant time); anything goes without a key."""
    if not key:
        return True
    return hmac.compare_digest((header or "").encode(), f"Bearer {key}".encode())


@web.middleware
async def _check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
    if authorized(request.app[AGENT].key, request.headers.get("Authorization")):
        return await handler(request)
    response = _error(401, "Authorization: expected Bearer <the replica's engine key>")
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _model(request: web.Request) -> str:
    name = request.query.get("model", "")
    if not name:
        raise web.HTTPBadRequest(
            text='{"error": "model: missing (fix: ?model=NAME)"}', content_type="application/json"
        )
    return name


async def _engines(request: web.Request) -> web.Response:
    return web.json_response(request.app[AGENT].body())


async def _wake(request: web.Request) -> web.Response:
    try:
        return web.json_response(await request.app[AGENT].wake(_model(request)))
    except UnknownModel as exc:
        return _error(404, str(exc))
    except EngineCallError as exc:
        return _error(502, str(exc))


async def _sleep(request: web.Request) -> web.Response:
    try:
        return web.json_response({"slept": await request.app[AGENT].sleep(_model(request))})
    except UnknownModel as exc:
        return _error(404, str(exc))
    except EngineCallError as exc:
        return _error(502, str(exc))


async def serve(agent: ReplicaAgent, host: str, port: int = 0) -> tuple[web.AppRunner, int]:
    """Start the agent on ``host:port`` (0: a free port); the runner (``cleanup()`` stops it) and port."""
    runner = web.AppRunner(make_app(agent), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, int(runner.addresses[0][1])
