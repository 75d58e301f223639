"""The replica agent's decisions, pure: which engines to put to sleep so that one more fits, what the
agent's answers say, and the GPU memory share of a pool member's engine.

A replica with sleep mode (a warm-tier deployment, or a model pool) runs one engine per model and keeps at
most ``max_awake`` of them holding GPU memory. An engine holds it while awake, and also while waking or
going to sleep (its weights are on the GPU for part of that time), so those states count too. When a model
must wake and the GPU is full, the awake engine used least recently sleeps first (LRU by ``last_used``:
its last wake, or the last time the agent saw requests running or waiting on it). A sleeping engine that
holds requests (sent to it just as it went to sleep) is woken, so none waits for ever.

I/O lives in ``hpcserve.serving.agent`` (the HTTP server and the calls to the engines).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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


def make_room(engines: Mapping[str, EngineView], max_awake: int, keep: str | None = None) -> list[str]:
    """The awake engines (never ``keep``) to put to sleep, least recently used first, so that one more
    engine fits beside those holding GPU memory; empty when it already fits."""
    holding = [name for name, e in engines.items() if e.state in HOLDS_GPU and name != keep]
    excess = len(holding) - max_awake + 1
    if excess <= 0:
        return []
    awake = [name for name in holding if engines[name].state is EngineState.AWAKE]
    return sorted(awake, key=lambda name: (engines[name].last_used, name))[:excess]


def victims(engines: Mapping[str, EngineView], max_awake: int, target: str) -> list[str]:
    """What to put to sleep before ``target`` wakes: nothing when it is awake already, else ``make_room``.
    Raises ``UnknownModel`` for a name no engine serves."""
    if target not in engines:
        raise UnknownModel(target, engines)
    if engines[target].state is EngineState.AWAKE:
        return []
    return make_room(engines, max_awake, keep=target)


def sleep_targets(engines: Mapping[str, EngineView], which: str) -> list[str]:
    """The engines ``POST /hpcserve/sleep?model=which`` puts to sleep (``all`` or one name): those not
    asleep already. Raises ``UnknownModel`` for a name no engine serves."""
    if which == ALL:
        names = sorted(engines)
    elif which in engines:
        names = [which]
    else:
        raise UnknownModel(which, engines)
    return [name for name in names if engines[name].state is not EngineState.ASLEEP]


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
