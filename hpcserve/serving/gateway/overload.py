"""Overload, decided purely: the priority queue's order, the drain rate, who is shed, Retry-After, fallback.

A deployment with ``overload.max_concurrency`` (model/gateway.py: ``Overload``) takes at most that many
requests per ready replica from this gateway; past it requests wait here, interactive ones first (first in,
first out), then batch ones. ``interactive_reserve`` slots per replica are never given to batch requests,
so an interactive request finds a free slot at once while batch load alone saturates the deployment.

The queue's drain rate is measured by Little's law: at saturation, requests leave at ``slots held / mean
time a request holds its slot`` per second, the mean being an EWMA over finished requests (slots held, not
all slots: a batch-only load holds fewer, the interactive reserve stays free). Unlike a count of
completions per second, it does not decay while the deployment idles, so the first burst after a quiet
spell is judged by how fast requests were served, not shed on a stale zero. A request's expected wait is
its position in the queue over that rate (unknown until one request has finished: nothing is shed blind).

``decide`` takes one arriving request:
- a free slot and nobody of its class or above waiting: ``Go``;
- expected wait past the fallback bound, a fallback that the key may use: ``FallBack``;
- at ``max_replicas`` with a shed bound, a position past ``floor(shed_wait_s x rate)`` (the queue that
  drains within the bound), or a full queue: ``Shed``, with Retry-After = ceil(expected wait), clamped to
  [``RETRY_AFTER_MIN_S``, ``RETRY_AFTER_MAX_S``];
- otherwise ``Wait``; ``evict`` counts queued batch requests (newest first) to shed now, because the
  arrival (interactive) pushed them past the bound. Below ``max_replicas`` nothing is shed: the queue is
  the autoscaler's signal (reported with the buffered requests).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from hpcserve.model.gateway import PRIORITIES, ApiKey, DeploymentRoute, Overload, Priority, Routes
from hpcserve.serving.gateway.tenancy import may_reach

T = TypeVar("T")
RETRY_AFTER_MIN_S = 1
RETRY_AFTER_MAX_S = 300  # a client told to come back later than 5 min would rather hear "no"
SERVICE_EWMA_ALPHA = 0.1  # weight of the newest finished request in the mean service time
ShedReason = Literal["overload", "evicted", "queue_full", "timeout", "gone"]  # gone: not counted
SHED_REASONS: tuple[ShedReason, ...] = ("overload", "evicted", "queue_full", "timeout")


class PriorityQueue(Generic[T]):
    """Waiters of one deployment: interactive first in first out, then batch likewise."""

    __slots__ = ("_lanes",)

    def __init__(self) -> None:
        self._lanes: dict[Priority, deque[T]] = {p: deque() for p in PRIORITIES}

    def __len__(self) -> int:
        return sum(len(lane) for lane in self._lanes.values())

    def __bool__(self) -> bool:
        """Whether anyone waits (asked after every request: no sum of the lanes' lengths)."""
        return any(self._lanes.values())

    def __iter__(self) -> Iterator[T]:
        """In the order they will be served."""
        for priority in PRIORITIES:
            yield from self._lanes[priority]

    def depth(self, priority: Priority) -> int:
        return len(self._lanes[priority])

    def ahead(self, priority: Priority) -> int:
        """How many wait before a request of ``priority`` that arrives now."""
        return len(self) if priority == "batch" else self.depth("interactive")

    def push(self, item: T, priority: Priority) -> int:
        """Queue ``item``; its 1-based position."""
        position = self.ahead(priority) + 1
        self._lanes[priority].append(item)
        return position

    def pop(self, priorities: Collection[Priority] = PRIORITIES) -> T | None:
        """The next to serve among ``priorities`` (interactive before batch), or None."""
        for priority in PRIORITIES:
            lane = self._lanes[priority]
            if priority in priorities and lane:
                return lane.popleft()
        return None

    def pop_newest(self, priority: Priority) -> T | None:
        lane = self._lanes[priority]
        return lane.pop() if lane else None

    def remove(self, item: T, priority: Priority) -> bool:
        lane = self._lanes[priority]
        if item in lane:
            lane.remove(item)
            return True
        return False


class ServiceTime:
    """EWMA of how long a request holds its slot (the first sample taken as it is)."""

    __slots__ = ("mean", "samples")

    def __init__(self) -> None:
        self.mean: float | None = None
        self.samples = 0

    def observe(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self.samples += 1
        if self.mean is None:
            self.mean = seconds
        else:
            self.mean += SERVICE_EWMA_ALPHA * (seconds - self.mean)


def drain_rate(slots: int, mean_service_s: float | None) -> float | None:
    """Requests per second a saturated deployment finishes (Little's law); None while unknown."""
    if mean_service_s is None or slots <= 0:
        return None
    return slots / max(mean_service_s, 1e-3)


def expected_wait(position: int, rate: float | None) -> float | None:
    """Seconds until a request at ``position`` (1-based) gets a slot; None while the rate is unknown."""
    return position / rate if rate else None


def retry_after(wait_s: float | None) -> int:
    """Retry-After in whole seconds: the expected wait rounded up, clamped (the upper clamp when unknown)."""
    if wait_s is None or not math.isfinite(wait_s):
        return RETRY_AFTER_MAX_S
    return min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, math.ceil(wait_s)))


def slots(overload: Overload, ready: int) -> tuple[int, int] | None:
    """(all slots, slots batch requests may hold) of a deployment with ``ready`` replicas; None: unbounded."""
    if overload.max_concurrency is None:
        return None
    total = overload.max_concurrency * ready
    reserve = min(overload.interactive_reserve, overload.max_concurrency - 1) * ready
    return total, total - reserve


def at_max(overload: Overload, ready: int) -> bool:
    """Whether the deployment runs as many replicas as it may (unknown maximum: yes)."""
    return overload.max_replicas is None or ready >= overload.max_replicas


def fallback_bound(overload: Overload) -> float | None:
    return overload.fallback_wait_s if overload.fallback_wait_s is not None else overload.shed_wait_s


@dataclass(frozen=True, slots=True)
class Load:
    """What ``decide`` reads of one deployment at this moment."""

    interactive: int  # waiting
    batch: int  # waiting
    free: bool  # a slot the arriving request's class may take
    rate: float | None  # drain rate, requests/s
    ready: int  # ready replicas
    queue_max: int  # waiters allowed

    @property
    def waiting(self) -> int:
        return self.interactive + self.batch

    def ahead(self, priority: Priority) -> int:
        return self.waiting if priority == "batch" else self.interactive


@dataclass(frozen=True, slots=True)
class Go:
    """Send it now."""


@dataclass(frozen=True, slots=True)
class Wait:
    """Queue it at ``position``; shed the ``evict`` newest queued batch requests first."""

    position: int
    wait_s: float | None
    evict: int = 0


@dataclass(frozen=True, slots=True)
class FallBack:
    """Send it to the fallback deployment instead."""

    target: str
    wait_s: float


@dataclass(frozen=True, slots=True)
class Shed:
    """Answer 503 with ``retry_after``; also shed the ``evict`` newest queued batch requests."""

    retry_after: int
    reason: ShedReason
    wait_s: float | None
    evict: int = 0


Decision = Go | Wait | FallBack | Shed


def decide(priority: Priority, load: Load, overload: Overload, may_fall_back: bool) -> Decision:
    """The fate of one arriving request (see the module docstring)."""
    ahead = load.ahead(priority)
    if load.free and ahead == 0:
        return Go()
    position = ahead + 1
    wait = expected_wait(position, load.rate)
    bound = fallback_bound(overload)
    if may_fall_back and overload.fallback and wait is not None and bound is not None and wait > bound:
        return FallBack(overload.fallback, wait)
    limit = shed_limit(overload, load)
    if load.waiting >= load.queue_max:
        if priority == "interactive" and load.batch:
            return Wait(position, wait, evict=1)
        return Shed(retry_after(wait), "queue_full", wait)
    if limit is not None and position > limit:
        return Shed(retry_after(wait), "overload", wait, evict=min(load.batch, max(0, load.waiting - limit)))
    evict = min(load.batch, max(0, load.waiting + 1 - limit)) if limit is not None else 0
    return Wait(position, wait, evict if priority == "interactive" else 0)


def shed_limit(overload: Overload, load: Load) -> int | None:
    """The longest queue that drains within ``shed_wait_s``; None: nothing is shed (no bound, the rate
    unknown, or the deployment may still grow)."""
    if overload.shed_wait_s is None or load.rate is None or not at_max(overload, load.ready):
        return None
    return math.floor(overload.shed_wait_s * load.rate)


def fallback_route(
    key: ApiKey, route: DeploymentRoute, routes: Routes, groups: Collection[str]
) -> tuple[str, DeploymentRoute] | None:
    """(model name to ask for, route) of ``route``'s fallback when ``key`` may use it: the key allows
    fallback, reaches the fallback deployment (tenancy.py) and the fallback has a ready replica."""
    target = route.overload.fallback
    if not key.allow_fallback or target is None or target == route.name:
        return None
    names = [(model, r) for model, r in routes.items() if r.name == target and r.ready()]
    allowed = [(model, r) for model, r in names if may_reach(key, model, r, groups)]
    if not allowed:
        return None
    return next(((m, r) for m, r in allowed if m == target), allowed[0])
