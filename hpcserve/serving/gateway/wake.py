"""Hold-and-wake: a request to a sleep-capable engine waits in the gateway until that engine is awake.

A replica of a warm-tier deployment or of a pool runs an agent beside its engines (``Endpoint.agent``,
hpcserve.serving.agent). Before a request goes to such an endpoint, the gateway:

1. reads each candidate replica's ``GET /hpcserve/engines`` (kept per agent, never older than
   ``agent_max_age_s``; many requests share one read; a failed read makes that replica unknown for as
   long, so a dead agent is not asked again by every request);
2. chooses (wake_choice.py, pure): a replica where the model is awake (then the usual least-outstanding
   choice among those), else one where it is waking, one with a free awake slot, or the one whose least
   recently used awake engine can sleep;
3. if it must wake: holds the request and calls ``POST /hpcserve/wake?model=NAME`` (the replica's engine
   key as Bearer token); concurrent requests for the same (replica, model) share that one call. Until
   it answers, the model counts as waking there and the engine the agent will put to sleep as sleeping,
   so no request is sent to it. The answer updates the view (``slept`` is asleep, the model awake). A
   failed wake tries another replica; none left: 503 with Retry-After.

It never sends to an engine it does not know to be awake, as of a view at most ``agent_max_age_s`` old:
another gateway, or the service moving a deployment to the warm tier, may put an engine to sleep within
that time; a request sent then waits parked in the engine, and the replica's agent wakes an engine it
finds asleep with requests parked in it (hpcserve.serving.agent). Waking counts toward the request's
TTFT (the proxy's clock started when the request arrived). Requests held here count as waiting demand in
the gateway's samples (``held``), as buffered ones do, so a warm deployment's requests reach the
autoscaler. Endpoints without an agent never come here (the proxy checks ``endpoint.agent``).

Metrics (``hpcserve_gateway_*``): ``wakes_total{model,result}`` (wake calls this gateway made: result
``woke``, ``awake`` when the model already was, ``failed``), ``wake_wait_seconds{model}`` (how long each
held request waited, a histogram), ``wake_held_requests{model}`` (held now).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import Literal, TypeVar

import aiohttp
import msgspec
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from hpcserve.model.gateway import DeploymentRoute, Endpoint
from hpcserve.serving.gateway.admission import Rejection
from hpcserve.serving.gateway.config import GatewayConfig
from hpcserve.serving.gateway.logs import OneLine
from hpcserve.serving.gateway.metrics import PREFIX, Buckets
from hpcserve.serving.gateway.wake_choice import (
    AgentView,
    EngineState,
    EngineView,
    Serve,
    Wake,
    choose,
)

log = logging.getLogger(__name__)
WAKE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120)
Result = Literal["woke", "awake", "failed"]
Pick = Callable[[Collection[str]], Endpoint | None]  # the usual choice, less the URLs given
NEVER = -float("inf")
_T = TypeVar("_T")


class WakeAnswer(msgspec.Struct, frozen=True):
    """The agent's answer to ``POST /hpcserve/wake``."""

    model: str
    woke: bool = False
    slept: str | None = None
    wake_s: float = 0.0


class AgentError(Exception):
    """An agent that could not be reached or answered other than 200 (one line: what and where)."""


class AgentClient:
    """The HTTP calls to agents (aiohttp; a few per second at most, off the path of awake engines)."""

    def __init__(self, connect_timeout_s: float, wake_timeout_s: float) -> None:
        self.connect_timeout_s, self.wake_timeout_s = connect_timeout_s, wake_timeout_s
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def engines(self, agent: str, key: str | None) -> AgentView:
        raw = await self._call("GET", f"{agent}/hpcserve/engines", key, self.connect_timeout_s * 2)
        return _decode(raw, AgentView, agent)

    async def wake(self, agent: str, key: str | None, model: str) -> WakeAnswer:
        url = f"{agent}/hpcserve/wake"
        raw = await self._call("POST", url, key, self.wake_timeout_s, {"model": model})
        return _decode(raw, WakeAnswer, agent)

    async def _call(
        self, method: str, url: str, key: str | None, timeout: float, params: dict[str, str] | None = None
    ) -> bytes:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        limit = aiohttp.ClientTimeout(total=timeout, sock_connect=self.connect_timeout_s)
        try:
            async with self._client().request(
                method, url, params=params, headers=headers, timeout=limit
            ) as response:
                body = await response.read()
        except (aiohttp.ClientError, TimeoutError) as err:
            raise AgentError(f"{method} {url}: {type(err).__name__}: {err}") from None
        if response.status != 200:
            raise AgentError(f"{method} {url} answered {response.status}: {body[:200]!r}")
        return body

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _decode(raw: bytes, kind: type[_T], agent: str) -> _T:
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.DecodeError as err:
        raise AgentError(f"agent {agent} answered what hpcserve cannot read: {err}") from None


class Waker:
    """What this gateway knows of the agents, the wakes in flight, and their counters."""

    def __init__(
        self, config: GatewayConfig, clock: Callable[[], float], wall: Callable[[], float],
        client: AgentClient | None = None,
    ) -> None:  # fmt: skip
        self.config, self.clock, self.wall = config, clock, wall
        self.client = client or AgentClient(config.connect_timeout_s, config.wake_timeout_s)
        self.views: dict[str, tuple[float, AgentView | None]] = {}  # agent -> (read at, view; None: failed)
        self._reads: dict[str, asyncio.Task[None]] = {}
        self._wakes: dict[tuple[str, str], tuple[asyncio.Task[str | None], str | None]] = {}  # -> victim
        self.held: dict[str, int] = {}  # deployment -> requests held for a wake now
        self.wakes: dict[tuple[str, Result], int] = {}  # (deployment, result) -> wake calls
        self.waits: dict[str, Buckets] = {}
        self.log = OneLine(log)

    async def awake(
        self, route: DeploymentRoute, tried: Collection[str], pick: Pick
    ) -> Endpoint | Rejection | None:
        """An endpoint of ``route`` whose engine is awake (woken if need be), not one of ``tried``; None
        when no candidate is left (the proxy's usual "no ready replica"); a 503 when none could be woken."""
        failed, problem = set(tried), "no replica's agent answered"
        held_since: float | None = None
        try:
            while candidates := [e for e in route.ready() if e.url not in failed]:
                await self._read(candidates)
                choice = choose(candidates, self._views())
                if isinstance(choice, Serve):
                    awake = {e.url for e in choice.endpoints}
                    return pick(failed | {e.url for e in candidates if e.url not in awake})
                if choice is None:
                    return self._unavailable(route.name, problem)
                if held_since is None:
                    held_since = self._hold(route.name)
                trouble = await self._wake(choice, route.name)
                if trouble is None:
                    return choice.endpoint
                failed.add(choice.endpoint.url)
                problem = trouble
            return self._unavailable(route.name, problem) if held_since is not None else None
        finally:
            if held_since is not None:
                self._release(route.name, self.clock() - held_since)

    def _unavailable(self, name: str, problem: str) -> Rejection:
        message = f"no replica of {name} could wake its engine: {problem}"
        return Rejection(
            503, message, "no_replica_ready", "service_unavailable", self.config.retry_after_s, name
        )

    def _hold(self, name: str) -> float:
        self.held[name] = self.held.get(name, 0) + 1
        return self.clock()

    def _release(self, name: str, waited: float) -> None:
        left = self.held.get(name, 1) - 1
        if left > 0:
            self.held[name] = left
        else:
            self.held.pop(name, None)
        buckets = self.waits.get(name)
        if buckets is None:
            buckets = self.waits[name] = Buckets(WAKE_BUCKETS)
        buckets.observe(waited)

    # -- the agents' views ----------------------------------------------------------------------------
    async def _read(self, candidates: Sequence[Endpoint]) -> None:
        """Read again the views older than ``agent_max_age_s`` (one read per agent at a time)."""
        since = self.clock() - self.config.agent_max_age_s
        stale: dict[str, str | None] = {}
        for e in candidates:
            if e.agent is not None and self.views.get(e.agent, (NEVER, None))[0] < since:
                stale[e.agent] = e.key
        if not stale:
            return
        tasks = [self._reads.get(agent) or self._start_read(agent, key) for agent, key in stale.items()]
        await asyncio.gather(*(asyncio.shield(t) for t in tasks))

    def _start_read(self, agent: str, key: str | None) -> asyncio.Task[None]:
        task = asyncio.ensure_future(self._read_one(agent, key))
        self._reads[agent] = task
        task.add_done_callback(lambda _: self._reads.pop(agent, None))
        return task

    async def _read_one(self, agent: str, key: str | None) -> None:
        asked = self.clock()
        try:
            view: AgentView | None = await self.client.engines(agent, key)
        except AgentError as err:
            self.log.warning("replica agent unknown for now: %s", err)
            view = None
        self.views[agent] = (asked, view)

    def _views(self) -> dict[str, AgentView]:
        """The views as this gateway believes them now: a wake in flight shows its model waking and its
        victim sleeping, whatever the last read said."""
        views = {agent: view for agent, (_, view) in self.views.items() if view is not None}
        for (agent, model), (_, victim) in self._wakes.items():
            if agent in views:
                states: dict[str, EngineState] = {model: "waking"}
                if victim is not None:
                    states[victim] = "sleeping"
                views[agent] = _with(views[agent], states)
        return views

    def _learn(self, agent: str, answer: WakeAnswer) -> None:
        """What a wake answer says: the model awake (used now), ``slept`` asleep."""
        read_at, view = self.views.get(agent, (0.0, None))
        if view is not None:
            states: dict[str, EngineState] = {answer.model: "awake"}
            if answer.slept:
                states[answer.slept] = "asleep"
            self.views[agent] = (read_at, _with(view, states, {answer.model: self.wall()}))

    # -- wakes ----------------------------------------------------------------------------------------
    async def _wake(self, choice: Wake, deployment: str) -> str | None:
        """Wake ``choice.model`` (or wait for the wake in flight); None once awake, else what failed."""
        agent = choice.endpoint.agent
        assert agent is not None
        key = (agent, choice.model)
        running = self._wakes.get(key)
        if running is None:
            task = asyncio.ensure_future(self._call_wake(choice, deployment))
            self._wakes[key] = (task, choice.victim)
            task.add_done_callback(lambda _: self._wakes.pop(key, None))
        else:
            task = running[0]
        return await asyncio.shield(task)

    async def _call_wake(self, choice: Wake, deployment: str) -> str | None:
        endpoint, agent = choice.endpoint, str(choice.endpoint.agent)
        try:
            answer = await self.client.wake(agent, endpoint.key, choice.model)
        except AgentError as err:
            self.log.warning("deployment %s: wake of %s failed: %s", deployment, choice.model, err)
            self.views.pop(agent, None)  # read it again before choosing it
            self._count(deployment, "failed")
            return f"replica {endpoint.replica}: {err}"
        self._learn(agent, answer)
        self._count(deployment, "woke" if answer.woke else "awake")
        return None

    def _count(self, deployment: str, result: Result) -> None:
        self.wakes[(deployment, result)] = self.wakes.get((deployment, result), 0) + 1

    # -- upkeep ---------------------------------------------------------------------------------------
    def prune(self, routes: Iterable[DeploymentRoute]) -> None:
        """Forget agents no route names any more, and the counters of deployments gone."""
        agents: set[str] = set()
        names: set[str] = set()
        for route in routes:
            names.add(route.name)
            agents.update(e.agent for e in route.endpoints if e.agent is not None)
        self.views = {a: v for a, v in self.views.items() if a in agents}
        self.wakes = {k: n for k, n in self.wakes.items() if k[0] in names}
        self.waits = {d: b for d, b in self.waits.items() if d in names}

    async def close(self) -> None:
        await self.client.close()

    def collector(self) -> Collector:
        return _WakeCollector(self)


def _with(view: AgentView, states: dict[str, EngineState], used: dict[str, float] | None = None) -> AgentView:
    """``view`` with some engines' states (and last use) changed; engines it does not list are left out."""
    engines = dict(view.engines)
    for name, state in states.items():
        engine = engines.get(name)
        if engine is not None:
            last = (used or {}).get(name, engine.last_used)
            engines[name] = EngineView(engine.port, state, last)
    return AgentView(view.max_awake, engines)


class _WakeCollector(Collector):
    def __init__(self, waker: Waker) -> None:
        self.waker = waker

    def collect(self) -> Iterator[Metric]:
        waker = self.waker
        wakes = CounterMetricFamily(PREFIX + "wakes", "Wake calls this gateway made to replica agents",
                                    labels=["model", "result"])  # fmt: skip
        for (model, result), n in sorted(waker.wakes.items()):
            wakes.add_metric([model, result], n)
        waits = HistogramMetricFamily(PREFIX + "wake_wait_seconds", "How long a request was held for its "
                                      "engine to wake", labels=["model"])  # fmt: skip
        for model, buckets in sorted(waker.waits.items()):
            waits.add_metric([model], buckets.cumulative(), buckets.total)
        held = GaugeMetricFamily(PREFIX + "wake_held_requests", "Requests held for a wake now",
                                 labels=["model"])  # fmt: skip
        for model, n in sorted(waker.held.items()):
            held.add_metric([model], n)
        return iter((wakes, waits, held))
