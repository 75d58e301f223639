"""The gateway's per-deployment slots and the queue of requests waiting for one (decisions: overload.py).

``Gate.acquire`` answers an admitted request with a ``Slot`` (send it now, or once a replica finishes a
request), a ``FallBack`` or a ``Shed``; ``Gate.release`` gives the slot back, measures how long it was held
and hands it to the next waiter at once (interactive first), so a request that just arrived never takes a
slot a waiter was owed. A deployment without ``max_concurrency`` has no queue: every request goes at once
and only its service time is measured. Waiters are bounded by ``queue_max`` per deployment and
``queue_timeout_s`` each; lanes exist per known deployment only.

Shedding is logged one line per burst: when a deployment starts shedding, and once it has shed nothing for
``QUIET_S`` (with the counts of the burst); never one line per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import msgspec

from hpcserve.model.gateway import PRIORITIES, DeploymentRoute, Priority
from hpcserve.serving.gateway.logs import OneLine
from hpcserve.serving.gateway.overload import (
    FallBack,
    Go,
    Load,
    PriorityQueue,
    ServiceTime,
    Shed,
    ShedReason,
    Wait,
    decide,
    drain_rate,
    expected_wait,
    retry_after,
    slots,
)

log = logging.getLogger(__name__)
QUIET_S = 5.0  # a shedding burst ends after this long without a shed


class Slot(msgspec.Struct, frozen=True):
    """A slot held by one request: give it back with ``Gate.release`` (a Struct: ~0.1 us to make, a frozen
    dataclass ~0.3 us)."""

    deployment: str
    priority: Priority
    since: float


@dataclass(eq=False, slots=True)
class _Ticket:
    priority: Priority
    future: asyncio.Future[Shed | None]  # None: the slot is granted


@dataclass(slots=True)
class _Burst:
    since: float
    last: float
    shed: dict[Priority, int] = field(default_factory=dict)


@dataclass(slots=True)
class Lane:
    """One deployment: slots held by class, the waiters, the service time and the counters."""

    held: dict[Priority, int] = field(default_factory=lambda: dict.fromkeys(PRIORITIES, 0))
    queue: PriorityQueue[_Ticket] = field(default_factory=PriorityQueue)
    service: ServiceTime = field(default_factory=ServiceTime)
    shed: dict[tuple[Priority, ShedReason], int] = field(default_factory=dict)
    fallbacks: dict[str, int] = field(default_factory=dict)  # fallback deployment -> requests sent
    capped: int = 0  # requests whose max_tokens the overload cap lowered
    burst: _Burst | None = None


class Gate:
    def __init__(
        self,
        routes: Callable[[], Mapping[str, DeploymentRoute]],
        clock: Callable[[], float],
        queue_max: int,
        queue_timeout_s: float,
    ) -> None:
        self._routes, self.clock = routes, clock
        self.queue_max, self.queue_timeout_s = queue_max, queue_timeout_s
        self.lanes: dict[str, Lane] = {}
        self.log = OneLine(log)

    def lane(self, deployment: str) -> Lane:
        lane = self.lanes.get(deployment)
        if lane is None:
            lane = self.lanes[deployment] = Lane()
        return lane

    def waiting(self, deployment: str, priority: Priority | None = None) -> int:
        lane = self.lanes.get(deployment)
        if lane is None:
            return 0
        return len(lane.queue) if priority is None else lane.queue.depth(priority)

    def rate(self, deployment: str) -> float | None:
        """The deployment's drain rate: requests/s it finishes with the slots now held (all of them while
        idle); None while unknown or unbounded."""
        route = self._routes().get(deployment)
        lane = self.lanes.get(deployment)
        if route is None or lane is None:
            return None
        bound = slots(route.overload, len(route.ready()))
        if bound is None:
            return None
        held = lane.held["interactive"] + lane.held["batch"]
        return drain_rate(held or bound[0], lane.service.mean)

    def _free(self, lane: Lane, route: DeploymentRoute, priority: Priority) -> bool:
        bound = slots(route.overload, len(route.ready()))
        if bound is None:
            return True
        total, batch = bound
        held = lane.held["interactive"] + lane.held["batch"]
        return held < total and (priority == "interactive" or lane.held["batch"] < batch)

    def take(self, route: DeploymentRoute, priority: Priority) -> Slot | None:
        """A slot for a request to ``route`` at once when one is free and nobody waits ahead (the common
        case: no decision to make, and no coroutine); else None: ``acquire`` decides."""
        lane = self.lane(route.name)
        if self._free(lane, route, priority) and not lane.queue.ahead(priority):
            return self._take(lane, route.name, priority)
        return None

    async def acquire(
        self, route: DeploymentRoute, priority: Priority, may_fall_back: bool
    ) -> Slot | FallBack | Shed:
        """A slot for a request to ``route`` (now, or after waiting its turn), or why not."""
        lane = self.lane(route.name)
        free = self._free(lane, route, priority)
        if free and not lane.queue.ahead(priority):  # the common case: no decision to make
            return self._take(lane, route.name, priority)
        load = Load(lane.queue.depth("interactive"), lane.queue.depth("batch"), free,
                    self.rate(route.name), len(route.ready()), self.queue_max)  # fmt: skip
        decision = decide(priority, load, route.overload, may_fall_back)
        if isinstance(decision, Go):
            return self._take(lane, route.name, priority)
        if isinstance(decision, FallBack):
            lane.fallbacks[decision.target] = lane.fallbacks.get(decision.target, 0) + 1
            return decision
        self._evict(lane, route.name, decision.evict, load.rate, ahead=isinstance(decision, Wait))
        if isinstance(decision, Shed):
            self._count(lane, route.name, priority, decision.reason, decision.wait_s)
            return decision
        return await self._wait(lane, route.name, priority)

    def _take(self, lane: Lane, deployment: str, priority: Priority) -> Slot:
        lane.held[priority] += 1
        return Slot(deployment, priority, self.clock())

    async def _wait(self, lane: Lane, deployment: str, priority: Priority) -> Slot | Shed:
        future: asyncio.Future[Shed | None] = asyncio.get_running_loop().create_future()
        ticket = _Ticket(priority, future)
        lane.queue.push(ticket, priority)
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                shed = await asyncio.shield(future)
        except TimeoutError:
            lane.queue.remove(ticket, priority)
            if future.done() and future.result() is None:  # granted at the last moment
                return Slot(deployment, priority, self.clock())
            wait = expected_wait(len(lane.queue) + 1, self.rate(deployment))
            shed = Shed(retry_after(wait), "timeout", wait)
            self._count(lane, deployment, priority, "timeout", wait)
            return shed
        except asyncio.CancelledError:  # the client went away while waiting
            if not lane.queue.remove(ticket, priority) and future.done() and future.result() is None:
                self.release(Slot(deployment, priority, self.clock()), finished=False)
            raise
        return shed if shed is not None else Slot(deployment, priority, self.clock())

    def release(self, slot: Slot, finished: bool = True) -> None:
        """Give a slot back (``finished``: a request was served, its time counts), and hand out slots."""
        lane = self.lanes.get(slot.deployment)
        if lane is None:
            return
        lane.held[slot.priority] = max(0, lane.held[slot.priority] - 1)
        if finished:
            lane.service.observe(self.clock() - slot.since)
        if not lane.queue:  # nobody to hand the slot to
            return
        route = self._routes().get(slot.deployment)
        if route is not None:
            self._hand_out(lane, route)

    def _hand_out(self, lane: Lane, route: DeploymentRoute) -> None:
        while lane.queue:
            allowed = [p for p in PRIORITIES if self._free(lane, route, p)]
            ticket = lane.queue.pop(allowed) if allowed else None
            if ticket is None:
                return
            if ticket.future.done():
                continue
            lane.held[ticket.priority] += 1
            ticket.future.set_result(None)

    def _evict(self, lane: Lane, deployment: str, count: int, rate: float | None, ahead: bool) -> None:
        """Shed the ``count`` newest queued batch requests, each told its own expected wait (``ahead``: the
        arrival that pushed them out joins the queue ahead of them)."""
        for _ in range(count):
            position = len(lane.queue) + ahead
            ticket = lane.queue.pop_newest("batch")
            if ticket is None:
                return
            wait = expected_wait(position, rate)
            if not ticket.future.done():
                ticket.future.set_result(Shed(retry_after(wait), "evicted", wait))
            self._count(lane, deployment, "batch", "evicted", wait)

    def _count(
        self, lane: Lane, deployment: str, priority: Priority, reason: ShedReason, wait: float | None
    ) -> None:
        lane.shed[(priority, reason)] = lane.shed.get((priority, reason), 0) + 1
        now = self.clock()
        if lane.burst is None:
            lane.burst = _Burst(now, now)
            shown = f"{wait:.1f} s" if wait is not None else "unknown"
            self.log.warning("deployment %s is overloaded: shedding (%s, expected wait %s, %d waiting)",
                             deployment, reason, shown, len(lane.queue))  # fmt: skip
        lane.burst.last = now
        lane.burst.shed[priority] = lane.burst.shed.get(priority, 0) + 1

    def tick(self) -> None:
        """Log the end of shedding bursts that have been quiet for ``QUIET_S``."""
        now = self.clock()
        for name, lane in self.lanes.items():
            burst = lane.burst
            if burst is not None and now - burst.last >= QUIET_S:
                lane.burst = None
                counts = ", ".join(f"{p} {n}" for p, n in sorted(burst.shed.items()))
                self.log.warning("deployment %s stopped shedding after %.1f s; shed %s", name,
                                 burst.last - burst.since, counts)  # fmt: skip

    def refresh(self, deployments: Collection[str]) -> None:
        """New routes: hand out slots that new replicas brought; waiters of deployments gone are shed."""
        routes = self._routes()
        for name in [n for n in self.lanes if n not in deployments]:
            lane = self.lanes.pop(name)
            for ticket in lane.queue:
                if not ticket.future.done():
                    ticket.future.set_result(Shed(retry_after(None), "gone", None))
        for name, lane in self.lanes.items():
            route = routes.get(name)
            if lane.queue and route is not None:
                self._hand_out(lane, route)
