"""The gateway's live state: the latest routes, requests outstanding per replica, and what goes with them.

Everything here is sized by known deployments, their endpoints and the keys of the last keys snapshot:
``outstanding`` holds only endpoints with requests in flight, ``ejected`` only replicas that refused a
connection in the last ``eject_s`` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence

from hpcserve.serving.gateway.admission import Admitted
from hpcserve.serving.gateway.buffer import ReplicaBuffer
from hpcserve.serving.gateway.config import GatewayConfig
from hpcserve.serving.gateway.keys import ApiKey, Keyring
from hpcserve.serving.gateway.metrics import GatewayMetrics
from hpcserve.serving.gateway.queue import Gate
from hpcserve.serving.gateway.routes import DeploymentRoute, Endpoint, Routes
from hpcserve.serving.gateway.routing import pick_endpoint, prefix_digest
from hpcserve.serving.gateway.stats import Stats
from hpcserve.serving.gateway.wake import Waker


class GatewayState:
    def __init__(
        self, config: GatewayConfig, keys: Sequence[ApiKey], clock: Callable[[], float],
        groups: Mapping[str, frozenset[str]] | None = None,
    ) -> None:  # fmt: skip
        self.config, self.clock = config, clock
        self.keyring = Keyring(keys, clock(), groups)
        self.key_ids = frozenset(k.id for k in keys)
        self.routes: Routes = {}
        self.deployments: dict[str, DeploymentRoute] = {}
        self.outstanding: dict[str, int] = {}
        self.ejected: dict[str, float] = {}  # url -> until
        self.buffer = ReplicaBuffer(config.buffer_max)
        self.gate = Gate(lambda: self.deployments, clock, config.queue_max, config.queue_timeout_s)
        self.stats = Stats()
        self.metrics = GatewayMetrics(self.stats, lambda: self.deployments, self.buffer.depth, self.gate)
        self.waker = Waker(config, clock, time.time)  # engines behind replica agents (sleep mode)
        self.metrics.registry.register(self.waker.collector())
        self._turn = 0

    def apply(self, routes: Routes) -> None:
        """Take a new snapshot: wake requests waiting for deployments that now have a ready replica."""
        self.routes = routes
        deployments = {r.name: r for r in routes.values()}
        changed = deployments.keys() != self.deployments.keys()
        self.deployments = deployments
        for name in self.buffer.waiting():
            route = deployments.get(name)
            if route is not None and route.ready():
                self.buffer.release(name)
        self.gate.refresh(deployments)  # new replicas bring slots; waiters of deployments gone are sent away
        if changed:
            self.buffer.forget_except(deployments)
            self.prune()
        now = self.clock()
        if self.ejected:
            self.ejected = {url: until for url, until in self.ejected.items() if until > now}

    def set_keys(self, keys: Sequence[ApiKey], groups: Mapping[str, frozenset[str]]) -> None:
        """Take a new keys snapshot: revoked keys stop working now; their unsent usage is still flushed."""
        self.keyring.update(keys, groups, self.clock())
        key_ids = frozenset(k.id for k in keys)
        if key_ids != self.key_ids:
            self.key_ids = key_ids
            self.prune()

    def prune(self) -> None:
        """Forget counters of deployments that are gone (and replica agents no route names)."""
        self.stats.prune(self.deployments, self.key_ids)
        self.metrics.prune(self.deployments)
        self.waker.prune(self.deployments.values())

    def ready(self, deployment: str) -> bool:
        route = self.deployments.get(deployment)
        return route is not None and bool(route.ready())

    def pick(self, request: Admitted, exclude: Collection[str]) -> Endpoint | None:
        """The replica for ``request`` (routing.pick_endpoint over the current snapshot)."""
        route = self.deployments.get(request.route.name)
        if route is None:
            return None
        self._turn += 1
        affinity = prefix_digest(request.prefix, self.config.affinity_chars) if request.prefix else None
        ready, bound = route.ready(), route.overload.max_concurrency
        avoid: Collection[str] = self.ejected
        if bound is not None:  # replicas at their bound too, while others have room
            avoid = {e.url for e in ready if self.outstanding.get(e.url, 0) >= bound} | self.ejected.keys()
        return pick_endpoint(
            ready, self.outstanding, turn=self._turn, affinity=affinity,
            slack=self.config.affinity_slack, exclude=exclude, avoid=avoid,
        )  # fmt: skip

    def acquire(self, endpoint: Endpoint) -> None:
        self.outstanding[endpoint.url] = self.outstanding.get(endpoint.url, 0) + 1

    def release(self, endpoint: Endpoint) -> None:
        left = self.outstanding.get(endpoint.url, 1) - 1
        if left > 0:
            self.outstanding[endpoint.url] = left
        else:
            self.outstanding.pop(endpoint.url, None)

    def eject(self, endpoint: Endpoint) -> None:
        """Send nothing to a replica that refused a connection for a while (unless no other is left)."""
        self.ejected[endpoint.url] = self.clock() + self.config.eject_s
