"""The serving controller's residency tiers and pools: what it loads and does for them each tick.

The decisions are pure (``hpcserve.serving.tiers``, ``hpcserve.serving.pools``); this module does the I/O
around them:
- a sleep-capable replica (one that announced ``models``: its ``url`` is its agent's) is asked
  ``GET /hpcserve/engines`` once a tick: the engines' states, and their ``last_used``, which counts as
  traffic (the gateway wakes an engine and serves a request between two ticks unseen otherwise);
- the tier is decided and stored when it changes (``store.set_tier``);
- in the warm tier every awake engine of a ready replica is put to sleep (``POST /hpcserve/sleep?model=all``,
  idempotent; the jobs are kept); a call that fails is logged and made again at the next tick;
- hot again because of the forecast floor (not a request: the gateway wakes on demand): every ready
  replica's engine is woken (``POST /hpcserve/wake``), so the burst finds it awake;
- cold and off are the autoscaler's scale to zero (the same idle window); off also removes the warm copies
  the replicas staged, by a job of the owner on each node (``hpcserve.serving.unstage``, from the controller);
- a pool's awake floor (``pools.awake_floor``): which members were requested lately, from the gateways'
  samples of each member and the agents' ``last_used`` of each member's engine (``members_seen``); its
  state is kept in the database (``service_state`` ``awake-floor:<pool>``), as the autoscaler's is, so a
  restarted or standby service goes on from it (``AwakeFloors``).

Agent calls carry the replica's engine key (``Authorization: Bearer``) and a short timeout; a tick waits
for the slowest replica, not for their sum.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from hpcserve.serving.pools import AwakeRule, AwakeState, as_replica_spec, awake_floor, is_pool
from hpcserve.serving.tiers import Tier, TierDecision, TierWindows, decide_tier

if TYPE_CHECKING:
    from hpcserve.serving.engine_stats import EngineStats
    from hpcserve.serving.spec import DeploymentSpec
    from hpcserve.store import Deployment, HistoryStore, Replica

log = logging.getLogger("hpcserve.serving")
AGENT_TIMEOUT_S = 5.0  # one agent call; a sleep that takes longer goes on, and is asked again next tick
AGENT_WORKERS = 16
AWAKE = "awake"
AWAKE_FLOOR_PREFIX = "awake-floor:"  # a pool's awake floor state in service_state
WAKING = "waking"  # a gateway is waking it for a request: demand

# (method, replica's agent URL, path with query, engine key) -> the answer's JSON, None when it failed
AgentCall = Callable[[str, str, str, "str | None"], "dict[str, Any] | None"]
Engines = Mapping[int, Mapping[str, Any]]  # each replica's engines (GET /hpcserve/engines), by index


def call_agent(method: str, url: str, path: str, key: str | None) -> dict[str, Any] | None:
    """One call to a replica's agent; None (logged) when it fails or times out."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.request(method, f"{url}{path}", headers=headers, timeout=AGENT_TIMEOUT_S)
        response.raise_for_status()
        answer = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        log.warning("replica agent %s %s%s failed: %s", method, url, path, exc)
        return None
    return answer if isinstance(answer, dict) else None


def sleep_capable(replica: Replica) -> bool:
    """A ready replica with an agent (it announced its engines)."""
    return replica.state == "ready" and bool(replica.models) and bool(replica.url)


def engine_urls(replica: Replica) -> list[str]:
    """The engines' base URLs: one per announced model on the replica's host, else the replica's URL."""
    if replica.models and replica.host:
        return [f"http://{replica.host}:{port}" for port in replica.models.values()]
    return [replica.url] if replica.url else []


def merge_stats(stats: Sequence[EngineStats]) -> EngineStats | None:
    """One replica's engines as one: requests and token counters summed, the rest the first engine's."""
    if not stats:
        return None
    first = stats[0]
    return replace(first, running=sum(s.running for s in stats), waiting=sum(s.waiting for s in stats),
                   prompt_tokens_total=sum(s.prompt_tokens_total for s in stats),
                   generation_tokens_total=sum(s.generation_tokens_total for s in stats))  # fmt: skip


def as_replica_deployment(deployment: Deployment) -> Deployment:
    """A pool row with its spec as its replicas' ``DeploymentSpec`` (for the autoscaler, the launcher and
    the limits); any other deployment as it is."""
    if not is_pool(deployment.spec):
        return deployment
    return replace(deployment, spec=as_replica_spec(deployment.spec))


@dataclass
class Residency:
    """The tier moves of one controller: ``agent`` does the HTTP (injected in tests)."""

    store: HistoryStore
    agent: AgentCall = call_agent

    def engines(self, replicas: Sequence[Replica]) -> dict[int, Mapping[str, Any]]:
        """Each sleep-capable replica's engines (``GET /hpcserve/engines``) by index; failed ones left out."""
        ready = [r for r in replicas if sleep_capable(r)]
        answers = self._each(ready, "GET", "/hpcserve/engines")
        return {r.index: a.get("engines") or {} for r, a in zip(ready, answers, strict=True) if a is not None}

    def apply(
        self, deployment: Deployment, replicas: Sequence[Replica], last_traffic: datetime | None,
        demand: bool, floor: int, now: datetime, engines: Engines | None = None,
    ) -> TierDecision:  # fmt: skip
        """Decide the tier (the agents' ``last_used`` counting as traffic), store it when it changed, and
        sleep or wake the replicas' engines for it; ``engines``: this tick's ``engines(replicas)`` when
        the caller asked already."""
        from hpcserve.serving.spec import DeploymentSpec

        spec = DeploymentSpec.model_validate(as_replica_deployment(deployment).spec)
        engines = self.engines(replicas) if engines is None else engines
        demand = demand or _in_state(engines, WAKING)
        used = _last_used(engines)
        last = max((t for t in (last_traffic, used) if t is not None), default=None)
        decision = decide_tier(TierWindows.of(spec), Tier.of(deployment.tier), last, now, demand, floor)
        if decision.changed:
            log.info("deployment %s: tier %s -> %s: %s", deployment.name, Tier.of(deployment.tier),
                     decision.tier, decision.reason)  # fmt: skip
            self.store.set_tier(deployment.name, decision.tier.value, now)
        ready = {r.index: r for r in replicas if sleep_capable(r)}
        if decision.tier is Tier.WARM:
            awake = [r for i, r in ready.items() if i not in engines or _in_state({i: engines[i]}, AWAKE)]
            self._each(awake, "POST", "/hpcserve/sleep?model=all")
        elif decision.woken_by_floor and not is_pool(deployment.spec):
            path = f"/hpcserve/wake?model={spec.served_model_name}"
            self._each(list(ready.values()), "POST", path)
        return decision

    def _each(self, replicas: Sequence[Replica], method: str, path: str) -> list[dict[str, Any] | None]:
        """The same agent call to each replica, at once; each one's answer (None: it failed)."""

        def call(replica: Replica) -> dict[str, Any] | None:
            return self.agent(method, str(replica.url), path, replica.engine_key)

        if len(replicas) <= 1:
            return [call(r) for r in replicas]
        with ThreadPoolExecutor(max_workers=min(len(replicas), AGENT_WORKERS)) as pool:
            return list(pool.map(call, replicas))


def _in_state(engines: Mapping[int, Mapping[str, Any]], state: str) -> bool:
    """Whether any engine of these replicas is in ``state``."""
    return any(isinstance(e, Mapping) and e.get("state") == state for found in engines.values()
               for e in found.values())  # fmt: skip


def _last_used(engines: Mapping[int, Mapping[str, Any]]) -> datetime | None:
    """The newest ``last_used`` (unix seconds) of any engine, as a time."""
    views = [e for found in engines.values() for e in found.values() if isinstance(e, Mapping)]
    stamps = [e.get("last_used") for e in views]
    numbers = [float(s) for s in stamps if isinstance(s, int | float) and s > 0]
    return datetime.fromtimestamp(max(numbers), UTC) if numbers else None


@dataclass
class PoolLoad:
    """What the controller adds up for a pool: its members' names (their gateway samples) and specs."""

    members: dict[str, list[Deployment]] = field(default_factory=dict)

    def names(self, deployment: Deployment) -> list[str]:
        """Whose gateway samples count for ``deployment``: a pool's members', else its own."""
        if is_pool(deployment.spec):
            return [m.name for m in self.members.get(deployment.name, [])]
        return [deployment.name]

    def stale(self, deployment: Deployment, replicas: Sequence[Replica]) -> frozenset[int]:
        """A pool's ready replicas whose engines are not its members now (one joined or left since they
        started): handed over to replicas started with the members of now, as from a draining node."""
        if not is_pool(deployment.spec) or deployment.deleted:
            return frozenset()
        wanted = self._served(deployment)
        ready = [r for r in replicas if r.state == "ready" and r.models is not None]
        return frozenset(r.index for r in ready if set(r.models or ()) != wanted)

    def settled(self, deployment: Deployment, replicas: Sequence[Replica]) -> bool:
        """Whether every replica of a live pool is ready and runs its members of now (none runs a member
        that left): then the copies of members that left are no replica's any more."""
        if not is_pool(deployment.spec) or deployment.deleted:
            return False
        wanted = self._served(deployment)
        return all(r.state == "ready" and set(r.models or ()) == wanted for r in replicas)

    def _served(self, pool: Deployment) -> set[str]:
        """The served names of the pool's members of now (its replicas' ``models`` keys)."""
        return {served_name(m) for m in self.members.get(pool.name, [])}

    def specs(self, deployment: Deployment) -> list[dict[str, Any]] | None:
        """The member specs a pool replica runs (None: not a pool)."""
        if not is_pool(deployment.spec):
            return None
        return [dict(m.spec) for m in self.members.get(deployment.name, [])]


def served_name(member: Deployment) -> str:
    """The name a member's engine runs under in its pool's replicas (their ``models`` keys)."""
    return str(member.served_model_name or member.spec.get("served_model_name") or member.name)


def members_seen(
    members: Sequence[Deployment], replicas: Sequence[Replica], engines: Engines,
    gateway: Mapping[str, datetime], now: datetime,
) -> dict[str, datetime | None]:  # fmt: skip
    """Each member's newest request seen this tick (None: none): a gateway sample of it with requests
    waiting (``gateway``, by member name), or its engine's ``last_used`` on a replica's agent (``now``
    while the agent wakes it: a gateway holds a request for it). A ``last_used`` before the replica was
    ready is its start's (the agent stamps every engine it starts), not a request's."""
    ready = {r.index: r.ready_at for r in replicas}
    seen: dict[str, datetime | None] = {}
    for member in members:
        stamps = [gateway.get(member.name)]
        for index, found in engines.items():
            engine = found.get(served_name(member))
            if isinstance(engine, Mapping):
                stamps.append(_used_at(engine, ready.get(index), now))
        seen[member.name] = max((t for t in stamps if t is not None), default=None)
    return seen


def _used_at(engine: Mapping[str, Any], ready_at: datetime | None, now: datetime) -> datetime | None:
    """When the agent last saw this engine used; None before its replica was ready."""
    if engine.get("state") == WAKING:
        return now
    stamp = engine.get("last_used")
    if not isinstance(stamp, int | float) or stamp <= 0:
        return None
    used = datetime.fromtimestamp(stamp, UTC)
    return used if ready_at is None or used > ready_at else None


@dataclass
class AwakeFloors:
    """The pools' awake floor states: loaded once a tick (``load``), each stored when it changed."""

    store: HistoryStore
    states: dict[str, AwakeState] = field(default_factory=dict)

    @classmethod
    def load(cls, store: HistoryStore) -> AwakeFloors:
        """Every pool's stored state (one query); one that no longer decodes starts afresh."""
        states = {}
        for name, data in store.states(AWAKE_FLOOR_PREFIX).items():
            try:
                states[name.removeprefix(AWAKE_FLOOR_PREFIX)] = msgspec.convert(data, AwakeState)
            except msgspec.ValidationError:
                log.warning("pool %s: stored awake floor state unreadable, starting afresh", name)
        return cls(store, states)

    def floor(
        self, pool: str, spec: DeploymentSpec, seen: Mapping[str, datetime | None], now: datetime
    ) -> int:
        """The pool's awake floor this tick (``pools.awake_floor``); its state kept for the next one."""
        old = self.states.get(pool, AwakeState())
        rule = AwakeRule.of(spec)
        floor, state = awake_floor(rule, seen, old, now)
        if len(state.last_request) != len(old.last_request):
            log.info("pool %s: %d members requested in the last %gs, %d awake per job: awake floor %d",
                     pool, len(state.last_request), rule.use_window_s, rule.max_awake, floor)  # fmt: skip
        if state != old:
            self.states[pool] = state
            self.store.put_state(AWAKE_FLOOR_PREFIX + pool, msgspec.to_builtins(state))
        return floor
