"""The gateway's aiohttp app: one stable OpenAI-compatible endpoint in front of every deployment's replicas.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (proxy.py), ``GET /v1/models`` (the model
names the key may reach; needs a key) and ``GET /health`` (``{"status": "ok"}``, no key). ``/metrics`` and
the detailed ``/health`` are not on this app: ``make_admin_app`` serves them on an admin address of their
own. Background tasks, started with the app: the routes source every ``refresh_interval_s``, the keys
source (when given) every ``keys_refresh_interval_s``, ``report`` every ``report_interval_s``,
``usage_sink`` every ``usage_flush_interval_s`` (and once at shutdown). Each runs in a worker thread, so a
source or sink may block (a database read); a failure is logged and the next tick tries again (the last
good routes and keys stay in force).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
from aiohttp import web

from hpcserve.serving.gateway.client import UpstreamPool
from hpcserve.serving.gateway.config import GatewayConfig
from hpcserve.serving.gateway.keys import ApiKey, KeySnapshot, KeySource
from hpcserve.serving.gateway.metrics import CONTENT_TYPE
from hpcserve.serving.gateway.proxy import UNAUTHORIZED, Proxy, error_response
from hpcserve.serving.gateway.routes import Refresh
from hpcserve.serving.gateway.state import GatewayState
from hpcserve.serving.gateway.stats import NO_KEY, Report, UsageSink, no_report, no_usage_sink
from hpcserve.serving.gateway.tenancy import reachable

log = logging.getLogger(__name__)
MISS_REFRESH_S = 0.25  # an unknown model re-reads the routes at most this often
STATE = web.AppKey("hpcserve.gateway.state", GatewayState)
_encode = msgspec.json.Encoder().encode


class Gateway:
    """The app's lifecycle (connection pool, background loops) and its small handlers."""

    def __init__(
        self, state: GatewayState, source: Refresh, report: Report, usage_sink: UsageSink,
        key_source: KeySource | None = None,
    ) -> None:  # fmt: skip
        self.state, self.source, self.report, self.usage_sink = state, source, report, usage_sink
        self.key_source = key_source
        self.config = state.config
        self._pool: UpstreamPool | None = None
        self.proxy = Proxy(state, self.pool, self.refresh_for_miss)
        self._refreshed_at = -math.inf  # monotonic time of the last routes refresh
        self._miss_lock: asyncio.Lock | None = None

    def pool(self) -> UpstreamPool:
        assert self._pool is not None, "the gateway app is not started"
        return self._pool

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: first routes before serving, loops while serving, last flush after."""
        cfg = self.config
        self._pool = UpstreamPool(cfg.upstream_connections, cfg.connect_timeout_s, cfg.read_timeout_s)
        await _guarded(self.refresh, "refresh")
        tasks = [
            asyncio.create_task(_every(cfg.refresh_interval_s, self.refresh, "refresh")),
            asyncio.create_task(_every(cfg.report_interval_s, self.tick, "report")),
            asyncio.create_task(_every(cfg.usage_flush_interval_s, self.flush, "usage flush")),
        ]
        if self.key_source is not None:
            await _guarded(self.refresh_keys, "keys refresh")
            tasks.append(
                asyncio.create_task(_every(cfg.keys_refresh_interval_s, self.refresh_keys, "keys refresh"))
            )
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _guarded(self.flush, "usage flush")
        self._pool.close()
        await self.state.waker.close()

    async def refresh(self) -> None:
        started = time.monotonic()
        routes = await _in_thread(self.source)
        self.state.apply(routes)
        self._refreshed_at = started
        self.pool().sweep()

    async def refresh_for_miss(self) -> bool:
        """Routes read again for a request naming a model this gateway does not know (a deployment made a
        moment ago): at once, or, when the last read is younger than ``MISS_REFRESH_S``, once it is that
        old (that read may have begun just before the deployment was made: a user's first request right
        after ``serve`` must find it). Many misses at once share one read (a read begun after a miss asked
        answers it), and unknown names cannot make the gateway poll the database faster than that. Whether
        a read happened after the request asked."""
        if self._miss_lock is None:
            self._miss_lock = asyncio.Lock()
        asked = time.monotonic()
        async with self._miss_lock:
            if self._refreshed_at >= asked:
                return True  # another miss's read, begun after this one asked
            wait = self._refreshed_at + MISS_REFRESH_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await _guarded(self.refresh, "refresh")
            return True

    async def refresh_keys(self) -> None:
        assert self.key_source is not None
        snapshot: KeySnapshot = await _in_thread(self.key_source)
        before = self.state.key_ids
        self.state.set_keys(snapshot.keys, snapshot.groups)
        after = self.state.key_ids
        if after != before:
            log.info(
                "API keys: %d live (%d new, %d gone)", len(after), len(after - before), len(before - after)
            )

    async def tick(self) -> None:
        state = self.state
        held = state.waker.held  # requests waiting for an engine to wake are demand too
        samples = state.stats.tick(state.clock(), datetime.now(UTC), state.deployments, state.buffer.depth,
                                   lambda d: state.gate.waiting(d) + held.get(d, 0))  # fmt: skip
        state.gate.tick()
        await _in_thread(self.report, samples)

    async def flush(self) -> None:
        rows = self.state.stats.flush(datetime.now(UTC))
        self.state.prune()
        if rows:
            await _in_thread(self.usage_sink, rows)

    async def models(self, request: web.Request) -> web.Response:
        """The models this key may reach (tenancy.py), and no others."""
        key = self.state.keyring.find(request.headers.get("Authorization"))
        if key is None:
            self.state.stats.count("_unknown", NO_KEY, 401)
            return error_response(UNAUTHORIZED)
        routes = self.state.routes
        names = reachable(key, routes, self.state.keyring.groups(key.owner))
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": routes[name].owner or "hpcserve"}
            for name in names
        ]
        return _json({"object": "list", "data": data})

    async def alive(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def health(self, request: web.Request) -> web.Response:
        state = self.state
        ready = sum(len(r.ready()) for r in state.deployments.values())
        buffered = sum(state.buffer.depth(d) for d in state.buffer.waiting())
        queued = sum(state.gate.waiting(d) for d in state.gate.lanes)
        return _json(
            {
                "status": "ok",
                "deployments": len(state.deployments),
                "ready_replicas": ready,
                "buffered": buffered,
                "queued": queued,
            }
        )

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.state.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def _json(data: object) -> web.Response:
    return web.Response(body=_encode(data), headers={"Content-Type": "application/json"})


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def _guarded(step: Callable[[], Awaitable[None]], what: str) -> None:
    try:
        await step()
    except Exception:
        log.exception("gateway %s failed; trying again next tick", what)


async def _every(interval: float, step: Callable[[], Awaitable[None]], what: str) -> None:
    while True:
        await asyncio.sleep(interval)
        await _guarded(step, what)


GATEWAY = web.AppKey("hpcserve.gateway", Gateway)


def make_app(
    config: GatewayConfig,
    source: Refresh,
    *,
    keys: Sequence[ApiKey] = (),
    key_source: KeySource | None = None,
    groups: Mapping[str, frozenset[str]] | None = None,
    report: Report = no_report,
    usage_sink: UsageSink = no_usage_sink,
    clock: Callable[[], float] = time.monotonic,
) -> web.Application:
    """The public gateway app (see the module docstring); run it with ``serve.run_gateway`` or an
    ``AppRunner``. Keys: ``keys`` (fixed, with their owners' ``groups``), or ``key_source`` polled for
    them."""
    state = GatewayState(config, keys, clock, groups)
    gateway = Gateway(state, source, report, usage_sink, key_source)
    app = web.Application(client_max_size=config.max_body_bytes)
    app[STATE] = state
    app[GATEWAY] = gateway
    app.cleanup_ctx.append(gateway.lifecycle)
    app.router.add_post("/v1/chat/completions", gateway.proxy.handle)
    app.router.add_post("/v1/completions", gateway.proxy.handle)
    app.router.add_get("/v1/models", gateway.models)
    app.router.add_get("/health", gateway.alive)
    return app


def make_admin_app(app: web.Application) -> web.Application:
    """``/metrics`` (Prometheus) and ``/health`` (deployments, ready replicas, buffered requests) of the
    gateway ``app``, for an admin address apart from the public port."""
    gateway = app[GATEWAY]
    admin = web.Application()
    admin.router.add_get("/metrics", gateway.metrics)
    admin.router.add_get("/health", gateway.health)
    return admin
