"""Scale from zero: requests for a deployment with no ready replica wait here, bounded, first in first out.

The depth per deployment is the autoscaler's signal to start a replica. A refresh that finds a ready
replica wakes the deployment's waiters in arrival order; one that no longer knows the deployment sends
them away. Queues exist only while someone waits, so memory is bounded by deployments x ``max_entries``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Collection
from typing import Literal

Outcome = Literal["ready", "gone", "timeout"]


class BufferFull(Exception):
    """The deployment already has ``max_entries`` requests waiting."""


class ReplicaBuffer:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._waiting: dict[str, deque[asyncio.Future[Outcome]]] = {}

    def depth(self, deployment: str) -> int:
        queue = self._waiting.get(deployment)
        return len(queue) if queue else 0

    async def wait(self, deployment: str, timeout: float) -> Outcome:
        """Wait for a ready replica ("ready"), for the deployment to go away ("gone") or ``timeout``.

        Raises BufferFull when the deployment's queue is full.
        """
        if self.depth(deployment) >= self.max_entries:
            raise BufferFull(deployment)
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(deployment, deque()).append(future)
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            return "timeout"
        finally:
            self._discard(deployment, future)

    def _discard(self, deployment: str, future: asyncio.Future[Outcome]) -> None:
        queue = self._waiting.get(deployment)
        if queue is not None and future in queue:
            queue.remove(future)
        if queue is not None and not queue:
            del self._waiting[deployment]

    def release(self, deployment: str, outcome: Outcome = "ready") -> int:
        """Wake every waiter of ``deployment`` in arrival order; returns how many."""
        queue = self._waiting.pop(deployment, None)
        if not queue:
            return 0
        for future in queue:
            if not future.done():
                future.set_result(outcome)
        return len(queue)

    def waiting(self) -> list[str]:
        """Deployments that have requests waiting."""
        return list(self._waiting)

    def forget_except(self, known: Collection[str]) -> None:
        """Send away the waiters of deployments no longer known."""
        for deployment in [d for d in self._waiting if d not in known]:
            self.release(deployment, "gone")
