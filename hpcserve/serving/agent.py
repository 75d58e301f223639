"""The replica agent: a small HTTP server in a sleep-mode replica job that wakes and sleeps its engines.

A replica of a deployment with sleep mode (warm tier, or a model pool) runs one engine per model, each
started with ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1``, and this agent beside them (in the
replica job's own process, as the deployment's owner). The replica announces the agent's port, so the
replica's URL is the agent's; the gateway asks it to wake a model before it sends that model a request.

API (every call needs ``Authorization: Bearer <engine key>`` when the replica has one; 401 otherwise):
- ``GET /hpcserve/engines`` -> ``{"max_awake": K, "engines": {NAME: {"port", "state", "last_used"}}}``;
- ``POST /hpcserve/wake?model=NAME`` -> blocks until NAME is awake: at once when fewer than K engines hold
  GPU memory, else once the awake engine used least recently, put to sleep for it, is asleep;
  ``{"model", "woke", "slept", "wake_s"}``; 404 for an unknown model;
- ``POST /hpcserve/sleep?model=NAME|all`` -> ``{"slept": [...]}`` once they are asleep (idempotent), and
  ``"kept": [...]`` when a wake waits for some of them: a model being woken for a request is demand, and
  is not put to sleep (one already going to sleep is woken once it is asleep).

Never more than K engines hold GPU memory: awake, waking and going to sleep all count. Wakes and sleeps
run concurrently, each as a task, so a wake into a free slot does not wait behind a slow sleep of another
engine (10 s at 64 GiB), and wakes of the same model share one. Which start is decided purely
(``agent_rules.next_moves``) between awaits, so no two decisions take the same slot. An engine is reported
``awake`` only after its ``/wake_up`` answered and its ``/is_sleeping`` said false. Sleeps use
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
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from hpcserve.serving.agent_rules import (
    EngineState,
    EngineView,
    Seen,
    SleepPlan,
    UnknownModel,
    engines_body,
    holding,
    make_room,
    next_moves,
    seen,
    sleep_body,
    sleep_plan,
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
_T = TypeVar("_T")


class EngineCallError(Exception):
    """An engine's /sleep, /wake_up or /is_sleeping failed: 502 with this one-line message."""


class ReplicaAgent:
    """The engines of one replica and their sleep states, by served model name (``add_engine`` as the
    replica starts each, on ``host``: this node); ``key`` is the engine key the agent's callers must
    present (and that it sends the engines); ``clock`` gives unix seconds (``last_used``).

    Every wake and sleep runs as a task of its own, started by ``_dispatch`` from the pure
    ``next_moves``; the state that counts (which engines hold GPU memory, which models wait) changes only
    between awaits, so two decisions never see the same free slot. A wake's callers share one task per
    model, each awaiting it shielded: a client that goes away mid-wake does not cut it short."""

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
        self._session: aiohttp.ClientSession | None = None
        self._poller: asyncio.Task[None] | None = None
        self._parked: dict[str, asyncio.Task[None]] = {}  # wakes for requests parked on sleeping engines
        self._waiting: list[str] = []  # models to wake that have no slot yet, first come first served
        self._wakes: dict[str, asyncio.Future[dict[str, Any]]] = {}  # model -> its wake's answer
        self._sleeps: dict[str, asyncio.Task[None]] = {}  # engines going to sleep
        self._tasks: set[asyncio.Task[Any]] = set()  # wakes and sleeps under way
        self._made_room: dict[str, list[str]] = {}  # model -> engines put to sleep for its wake
        self._reserved = 0  # slots kept for engines the replica is starting (make_room, add_engine)
        self._changed = asyncio.Event()  # set (and replaced) whenever a wake or sleep ends
        self._closing = False

    # -- lifecycle --------------------------------------------------------------------------------

    async def open(self) -> None:
        """The HTTP client to the engines and the /metrics poller."""
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)
            self._session = aiohttp.ClientSession(timeout=timeout, headers=self._auth())
            self._poller = asyncio.create_task(self._poll(), name="agent-metrics-poll")

    async def close(self) -> None:
        self._closing = True  # no wake or sleep starts from here on
        tasks = [*self._parked.values(), *self._tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._session is not None:
            await self._session.close()
        self._session = self._poller = None
        self._closing = False

    async def add_engine(self, name: str, port: int) -> None:
        """Track a healthy engine (in the slot ``make_room`` kept for it); its state is what its
        /is_sleeping says."""
        sleeping = await self._is_sleeping(port)
        state = EngineState.ASLEEP if sleeping else EngineState.AWAKE
        self.engines[name] = EngineView(port, state, self.clock())
        self._reserved = max(0, self._reserved - 1)

    # -- the API's operations ---------------------------------------------------------------------

    async def wake(self, name: str) -> dict[str, Any]:
        """Wake ``name``: at once when a slot is free, else once the LRU awake engine put to sleep for it
        (or a sleep under way) frees one; callers waking the same model share one wake."""
        if name not in self.engines:
            raise UnknownModel(name, self.engines)
        if name not in self._wakes:
            if self.engines[name].state is EngineState.AWAKE:
                self._touch(name)
                return wake_body(name, False, [], 0.0)
            self._wakes[name] = asyncio.get_running_loop().create_future()
            self._waiting.append(name)
            self._dispatch()
        return await asyncio.shield(self._wakes[name])

    async def sleep(self, which: str) -> SleepPlan:
        """Put ``which`` (a model name, or ``all``) to sleep, but never a model a wake waits for: what was
        put to sleep (or was going to sleep already), and what was kept."""
        plan = sleep_plan(self.engines, which, self._wakes)
        tasks = [self._sleeps.get(name) or self._start_sleep(name) for name in plan.sleep]
        done = await asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)
        failed = [error for error in done if isinstance(error, BaseException)]
        if failed:
            raise failed[0]
        return plan

    async def make_room(self) -> list[str]:
        """Sleep engines (LRU) until one more fits, and keep that slot for the engine the replica starts
        next (``add_engine`` takes it); the engines put to sleep."""
        slept: list[str] = []
        while holding(self.engines) + self._reserved >= self.max_awake:
            names = make_room(self.engines, self.max_awake, self._wakes, self._reserved)
            changed = self._changed
            await asyncio.gather(*(asyncio.shield(self._start_sleep(n)) for n in names))
            slept += names
            if not names:
                await changed.wait()
        self._reserved += 1
        return slept

    def body(self) -> dict[str, Any]:
        return engines_body(self.max_awake, self.engines)

    @property
    def models(self) -> dict[str, int]:
        """``{served model name: engine port}``: what the replica announces."""
        return {name: e.port for name, e in self.engines.items()}

    # -- starting wakes and sleeps (no await: each decision sees the state the last one left) -----

    def _dispatch(self) -> None:
        """Answer the waiting models that are awake, wake those with a free slot, and put engines to
        sleep for the others (``next_moves``)."""
        moves = next_moves(self.engines, self.max_awake, self._waiting, self._reserved)
        for name in moves.ready:
            self._waiting.remove(name)
            self._answer(name, wake_body(name, False, self._made_room.pop(name, []), 0.0))
        for victim, target in moves.sleep.items():
            self._made_room.setdefault(target, []).append(victim)
            self._start_sleep(victim)
        for name in moves.wake:
            self._waiting.remove(name)
            self._set(name, EngineState.WAKING)
            self._track(self._wake_one(name), f"agent-wake-{name}", partial(self._woke, name))

    def _start_sleep(self, name: str) -> asyncio.Task[None]:
        self._set(name, EngineState.SLEEPING)
        self._sleeps[name] = self._track(
            self._sleep_one(name), f"agent-sleep-{name}", partial(self._slept, name)
        )
        return self._sleeps[name]

    def _track(
        self, work: Coroutine[Any, Any, _T], label: str, done: Callable[[asyncio.Task[_T]], None]
    ) -> asyncio.Task[_T]:
        task = asyncio.create_task(work, name=label)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(done)
        return task

    def _woke(self, name: str, task: asyncio.Task[float]) -> None:
        """An engine's wake ended: its callers get the answer (or the error)."""
        slept = self._made_room.pop(name, [])
        if task.cancelled():
            self._fail(name, asyncio.CancelledError())
        elif (error := task.exception()) is not None:
            self._fail(name, error)
        else:
            self._answer(name, wake_body(name, True, slept, task.result()))
        self._settled()

    def _slept(self, name: str, task: asyncio.Task[None]) -> None:
        """An engine's sleep ended: a wake it made room for fails with it when it failed."""
        self._sleeps.pop(name, None)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            for target in [t for t, victims in self._made_room.items() if name in victims]:
                if target in self._waiting:
                    self._waiting.remove(target)
                    self._made_room.pop(target, None)
                    self._fail(target, error)
        self._settled()

    def _settled(self) -> None:
        """A wake or sleep ended: slots may be free; wake whoever waits for one."""
        self._changed.set()
        self._changed = asyncio.Event()
        if not self._closing:
            self._dispatch()

    def _answer(self, name: str, body: dict[str, Any]) -> None:
        future = self._wakes.pop(name, None)
        if future is not None and not future.done():
            future.set_result(body)

    def _fail(self, name: str, error: BaseException) -> None:
        future = self._wakes.pop(name, None)
        if future is None or future.done():
            return
        if isinstance(error, asyncio.CancelledError):
            future.cancel()
            return
        future.set_exception(error)
        future.exception()  # retrieved here too: a wake no caller awaits any more logs nothing

    # -- engine calls -----------------------------------------------------------------------------

    async def _sleep_one(self, name: str) -> None:
        """``/sleep`` (level 1, mode=wait) of an engine ``_start_sleep`` marked going to sleep."""
        try:
            await self._post(name, "/sleep", SLEEP_QUERY)
        finally:
            await self._settle(name)
        if self.engines[name].state is not EngineState.ASLEEP:
            raise EngineCallError(f"engine {name!r} still says it is awake after /sleep")
        log.info("agent: %s asleep", name)

    async def _wake_one(self, name: str) -> float:
        """``/wake_up`` of an engine ``_dispatch`` marked waking; the seconds it took."""
        started = time.monotonic()
        try:
            await self._post(name, "/wake_up", {})
        finally:
            await self._settle(name)
        if self.engines[name].state is not EngineState.AWAKE:
            raise EngineCallError(f"engine {name!r} still says it is asleep after /wake_up")
        self._touch(name)
        log.info("agent: %s awake", name)
        return time.monotonic() - started

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
        return web.json_response(sleep_body(await request.app[AGENT].sleep(_model(request))))
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
