"""Which replica serves a request to a sleep-capable engine: a pure choice over the agents' answers.

A replica with an agent (a warm-tier deployment's, or a pool's: several engines, at most ``max_awake``
of them awake) says through ``GET /hpcserve/engines`` which of its engines are awake. For a request to
model m, among the candidate endpoints (ready, not failed for this request), the rule is, first match:

1. the endpoints where m is awake: send now (the usual least-outstanding choice among them);
2. a replica where m is already waking: wait for that wake (the agent answers once m is awake);
3. a replica with a free awake slot (fewer than ``max_awake`` engines holding GPU memory: awake, waking
   or going to sleep, as the agent counts them, ``agent_rules.HOLDS_GPU``), the most free slots first:
   wake m there at once, nothing sleeps;
4. a replica where an engine is going to sleep and no slot is taken otherwise: the agent gives m that
   slot when the sleep ends (the rest of a sleep, rather than a whole sleep of another engine);
5. the replica whose least recently used awake engine was used longest ago: wake m there; the agent
   first sleeps that engine (the ``victim``);
6. (every slot taken by engines waking) the first candidate: the agent queues the wake, first come first
   served, until a slot frees.

A candidate whose agent gave no answer, or that lists no engine on the endpoint's port, is not chosen:
the gateway never sends to an engine it does not know to be awake. Among equals the candidates' order
decides, so the choice is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import msgspec

from hpcserve.model.gateway import Endpoint
from hpcserve.serving.agent_rules import HOLDS_GPU

EngineState = Literal["awake", "asleep", "waking", "sleeping"]
OCCUPYING: frozenset[str] = frozenset(str(state) for state in HOLDS_GPU)  # what counts toward max_awake


class EngineView(msgspec.Struct, frozen=True):
    """One engine in an agent's answer: its port on the replica's host, its state, and when it was last
    used (unix seconds: its last wake, or the last time the agent saw it with requests)."""

    port: int
    state: EngineState
    last_used: float = 0.0


class AgentView(msgspec.Struct, frozen=True):
    """An agent's ``GET /hpcserve/engines`` answer: engines by served model name."""

    max_awake: int
    engines: dict[str, EngineView] = {}

    def model_at(self, port: int) -> str | None:
        """The served model name of the engine on ``port`` (None: the agent runs none there)."""
        for name, engine in self.engines.items():
            if engine.port == port:
                return name
        return None

    def free_slots(self) -> int:
        """Slots free now: ``max_awake`` less the engines holding GPU memory (going to sleep included)."""
        return self.max_awake - sum(1 for e in self.engines.values() if e.state in OCCUPYING)

    def freeing_slots(self) -> int:
        """Slots free once the sleeps under way end."""
        return self.max_awake - sum(1 for e in self.engines.values() if e.state in ("awake", "waking"))

    def least_recent(self) -> tuple[float, str] | None:
        """(last_used, name) of the awake engine used longest ago (None: none is awake)."""
        awake = [(e.last_used, name) for name, e in self.engines.items() if e.state == "awake"]
        return min(awake) if awake else None


@dataclass(frozen=True, slots=True)
class Serve:
    """Send now, to one of these endpoints (each with its engine awake)."""

    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class Wake:
    """Wake ``model`` behind ``endpoint`` through its agent, then send there; the agent first sleeps
    ``victim`` (None: a slot is free, or the model is already waking)."""

    endpoint: Endpoint
    model: str
    victim: str | None = None


def endpoint_port(url: str) -> int | None:
    """The port of an ``http://host:port`` URL (None without one)."""
    _, _, tail = url.rpartition(":")
    return int(tail) if tail.isdigit() else None


def engine_of(endpoint: Endpoint, views: Mapping[str, AgentView]) -> tuple[AgentView, str] | None:
    """The endpoint's agent view and the model its engine serves (None: unknown)."""
    view = views.get(endpoint.agent) if endpoint.agent is not None else None
    port = endpoint_port(endpoint.url)
    if view is None or port is None:
        return None
    model = view.model_at(port)
    return (view, model) if model is not None else None


def choose(candidates: Sequence[Endpoint], views: Mapping[str, AgentView]) -> Serve | Wake | None:
    """The replica for the request (see the module docstring); None when no candidate is known."""
    known = [(e, *found) for e in candidates if (found := engine_of(e, views)) is not None]
    awake = tuple(e for e, view, model in known if view.engines[model].state == "awake")
    if awake:
        return Serve(awake)
    for endpoint, view, model in known:
        if view.engines[model].state == "waking":
            return Wake(endpoint, model)
    first = Wake(known[0][0], known[0][2]) if known else None
    return (
        _free_slot(known, AgentView.free_slots)
        or _free_slot(known, AgentView.freeing_slots)
        or _least_recent(known)
        or first
    )


def _free_slot(
    known: Sequence[tuple[Endpoint, AgentView, str]], slots: Callable[[AgentView], int]
) -> Wake | None:
    """Where ``slots`` says a slot is free, the most first (the first such candidate among equals)."""
    best: tuple[int, Endpoint, str] | None = None
    for endpoint, view, model in known:
        free = slots(view)
        if free > 0 and (best is None or free > best[0]):
            best = (free, endpoint, model)
    return Wake(best[1], best[2]) if best is not None else None


def _least_recent(known: Sequence[tuple[Endpoint, AgentView, str]]) -> Wake | None:
    """The replica whose least recently used awake engine was used longest ago; that engine sleeps."""
    best: tuple[float, Endpoint, str, str] | None = None
    for endpoint, view, model in known:
        lru = view.least_recent()
        if lru is not None and (best is None or lru[0] < best[0]):
            best = (lru[0], endpoint, model, lru[1])
    return Wake(best[1], best[2], best[3]) if best is not None else None
