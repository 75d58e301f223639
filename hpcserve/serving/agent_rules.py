"""The replica agent's decisions, pure: which waiting wakes start now and which engines go to sleep for
them (``next_moves``), which engines a sleep call puts to sleep (``sleep_plan``), what the agent's answers
say, and the GPU memory share of a pool member's engine.

A replica with sleep mode (a warm-tier deployment, or a model pool) runs one engine per model and keeps at
most ``max_awake`` of them holding GPU memory. An engine holds it while awake, and also while waking or
going to sleep (its weights are on the GPU for part of that time), so those states count too, and so do
the slots ``reserved`` for engines the replica is starting. A wake with a free slot starts at once, even
while other engines are going to sleep (a level-1 sleep takes seconds: 10 s for 64 GiB); a wake without
one waits, and the awake engine used least recently is put to sleep for it (LRU by ``last_used``: its last
wake, or the last time the agent saw requests running or waiting on it) unless a sleep already under way
will free a slot for it. A model that a wake waits for is demand: no sleep call puts it to sleep. A
sleeping engine that holds requests (sent to it just as it went to sleep) is woken, so none waits for ever.

I/O lives in ``hpcserve.serving.agent`` (the HTTP server and the calls to the engines).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

DEFAULT_GPU_SHARE = 0.9  # vLLM's default --gpu-memory-utilization: the whole job's share of each GPU
ALL = "all"  # POST /hpcserve/sleep?model=all


class EngineState(StrEnum):
    AWAKE = "awake"
    ASLEEP = "asleep"
    WAKING = "waking"
    SLEEPING = "sleeping"


HOLDS_GPU = frozenset({EngineState.AWAKE, EngineState.WAKING, EngineState.SLEEPING})


class UnknownModel(KeyError):
    """A model name that no engine of this replica serves (404)."""

    def __init__(self, name: str, known: Mapping[str, object]) -> None:
        super().__init__(name)
        self.message = (
            f"model: {name!r} is not served by this replica (fix: one of {', '.join(sorted(known))})"
        )

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class EngineView:
    """One engine as the agent sees it: its port on this node, its state and when it was last used."""

    port: int
    state: EngineState
    last_used: float


def holding(engines: Mapping[str, EngineView]) -> int:
    """How many engines hold GPU memory (awake, waking or going to sleep)."""
    return sum(1 for e in engines.values() if e.state in HOLDS_GPU)


def make_room(
    engines: Mapping[str, EngineView],
    max_awake: int,
    wanted: Collection[str] = (),
    reserved: int = 0,
    slots: int = 1,
) -> list[str]:
    """The awake engines (never one in ``wanted``) to put to sleep, least recently used first, so that
    ``slots`` more engines fit beside those holding GPU memory and the ``reserved`` slots; engines going to
    sleep already (none wanted) count as slots coming free. Empty when they fit, or will."""
    coming_free = sum(1 for n, e in engines.items() if e.state is EngineState.SLEEPING and n not in wanted)
    excess = holding(engines) + reserved + slots - max_awake - coming_free
    if excess <= 0:
        return []
    awake = [n for n, e in engines.items() if e.state is EngineState.AWAKE and n not in wanted]
    return sorted(awake, key=lambda name: (engines[name].last_used, name))[:excess]


@dataclass(frozen=True, slots=True)
class Moves:
    """What the agent does now for the models waiting to wake: answer those ``ready`` (awake already),
    ``wake`` those with a free slot, and put to ``sleep`` awake engines (each for the waiting model it
    makes room for)."""

    ready: tuple[str, ...] = ()
    wake: tuple[str, ...] = ()
    sleep: Mapping[str, str] = field(default_factory=dict)


def next_moves(
    engines: Mapping[str, EngineView], max_awake: int, waiting: Sequence[str], reserved: int = 0
) -> Moves:
    """The moves for ``waiting`` (models to wake, first come first served): each asleep one wakes while a
    slot is free; for the rest, LRU awake engines that no one waits for go to sleep, but only as many as
    the sleeps under way (of engines no one waits for) do not cover. A waiting model that is going to sleep
    waits for its sleep to end: that frees its own slot. Never more than ``max_awake`` hold GPU memory."""
    order = list(dict.fromkeys(waiting))
    free = max_awake - holding(engines) - reserved
    ready = tuple(n for n in order if engines[n].state is EngineState.AWAKE)
    asleep = [n for n in order if engines[n].state is EngineState.ASLEEP]
    wake, short = asleep[: max(0, free)], asleep[max(0, free) :]
    if not short:
        return Moves(ready, tuple(wake))
    after = {**engines, **{n: replace(engines[n], state=EngineState.WAKING) for n in wake}}
    victims = make_room(after, max_awake, set(order), reserved, len(short))
    targets = short[max(0, len(short) - len(victims)) :]  # the first get the slots of sleeps under way
    return Moves(ready, tuple(wake), {v: targets[min(i, len(targets) - 1)] for i, v in enumerate(victims)})


@dataclass(frozen=True, slots=True)
class SleepPlan:
    """What ``POST /hpcserve/sleep`` does: put ``sleep`` to sleep (or wait for their sleep under way), and
    keep ``kept`` awake: models a wake waits for (demand)."""

    sleep: list[str]
    kept: list[str]


def sleep_plan(engines: Mapping[str, EngineView], which: str, wanted: Collection[str] = ()) -> SleepPlan:
    """The engines ``POST /hpcserve/sleep?model=which`` (``all`` or one name) puts to sleep: those not
    asleep already, except the ``wanted`` ones (a wake waits for them) and those waking, which it keeps.
    Raises ``UnknownModel`` for a name no engine serves."""
    if which == ALL:
        names = sorted(engines)
    elif which in engines:
        names = [which]
    else:
        raise UnknownModel(which, engines)
    kept = [n for n in names if n in wanted or engines[n].state is EngineState.WAKING]
    sleep = [n for n in names if engines[n].state is not EngineState.ASLEEP and n not in kept]
    return SleepPlan(sleep, kept)


def in_use(running: int, waiting: int) -> bool:
    """Whether an engine's scrape shows it used (requests running or waiting)."""
    return running + waiting > 0


class Seen(StrEnum):
    """What one /metrics scrape of an engine says: unused, used (``last_used`` moves on), or asleep with
    requests parked in its queue (sent while it went to sleep, e.g. by a gateway whose view was a moment
    old): those wait until it wakes, so the agent wakes it."""

    IDLE = "idle"
    USED = "used"
    PARKED = "parked"


def seen(state: EngineState, running: int, waiting: int) -> Seen:
    """How to read one scrape of an engine in ``state``."""
    if not in_use(running, waiting):
        return Seen.IDLE
    return Seen.PARKED if state is EngineState.ASLEEP else Seen.USED


def member_gpu_utilization(gpu_fraction: float | None, max_awake: int) -> float:
    """``--gpu-memory-utilization`` of one engine of a pool replica: the job's share of each GPU
    (``gpu_fraction``, else vLLM's default 0.9) split between the ``max_awake`` engines awake at once."""
    share = DEFAULT_GPU_SHARE if gpu_fraction is None else gpu_fraction
    return round(share / max_awake, 4)


def engines_body(max_awake: int, engines: Mapping[str, EngineView]) -> dict[str, Any]:
    """``GET /hpcserve/engines``'s answer."""
    listed = {
        name: {"port": e.port, "state": str(e.state), "last_used": round(e.last_used, 3)}
        for name, e in sorted(engines.items())
    }
    return {"max_awake": max_awake, "engines": listed}


def wake_body(model: str, woke: bool, slept: list[str], wake_s: float) -> dict[str, Any]:
    """``POST /hpcserve/wake``'s answer: ``slept`` names the engine put to sleep to make room (or null)."""
    return {"model": model, "woke": woke, "slept": slept[0] if slept else None, "wake_s": round(wake_s, 3)}


def sleep_body(plan: SleepPlan) -> dict[str, Any]:
    """``POST /hpcserve/sleep``'s answer: ``slept``, and ``kept`` (models a wake waits for) when any."""
    return {"slept": plan.sleep, **({"kept": plan.kept} if plan.kept else {})}
