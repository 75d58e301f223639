"""The gateway: one stable OpenAI-compatible endpoint in front of every deployment's replicas.

``make_app(config, source, keys=... | key_source=..., report=..., usage_sink=...)`` builds the aiohttp app;
``source`` is a ``refresh() -> Mapping[str, DeploymentRoute]`` (``StaticRoutes``, ``routes_from_file``, or
the database). Modules: routes (snapshot types, sources), routing (pure replica choice), admission (pure
request checks), tenancy (pure: which models a key reaches), keys (API keys, token buckets), buffer
(scale-from-zero wait), wake and wake_choice (hold a request while a sleeping engine wakes; pure choice of
the replica), stats and metrics (counters, callbacks, Prometheus), client and response
(the HTTP/1.1 hop to replicas, parsed by httptools), upstream and proxy (relaying), logs (one line per
bad request), state, app (``make_app``, ``make_admin_app``), serve (``run_gateway``: uvloop, file limits,
the admin address).

The names below are loaded on first use, so importing one pure module (``gateway.keys``) does not load
aiohttp.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hpcserve.serving.gateway.app import make_admin_app, make_app
    from hpcserve.serving.gateway.config import GatewayConfig
    from hpcserve.serving.gateway.keys import ApiKey, KeySnapshot, hash_key, load_keys, parse_keys
    from hpcserve.serving.gateway.routes import (
        DeploymentRoute,
        Endpoint,
        Refresh,
        Routes,
        StaticRoutes,
        load_routes,
        parse_routes,
        routes_from_file,
    )
    from hpcserve.serving.gateway.stats import GatewaySample, Report, UsageRow, UsageSink

_WHERE = {
    "make_app": "app", "make_admin_app": "app", "GatewayConfig": "config", "ApiKey": "keys",
    "KeySnapshot": "keys", "hash_key": "keys", "load_keys": "keys", "parse_keys": "keys",
    "DeploymentRoute": "routes", "Endpoint": "routes", "Refresh": "routes", "Routes": "routes",
    "StaticRoutes": "routes", "load_routes": "routes", "parse_routes": "routes", "routes_from_file": "routes",
    "GatewaySample": "stats", "Report": "stats", "UsageRow": "stats", "UsageSink": "stats",
}  # fmt: skip

__all__ = [
    "ApiKey",
    "DeploymentRoute",
    "Endpoint",
    "GatewayConfig",
    "GatewaySample",
    "KeySnapshot",
    "Refresh",
    "Report",
    "Routes",
    "StaticRoutes",
    "UsageRow",
    "UsageSink",
    "hash_key",
    "load_keys",
    "load_routes",
    "make_admin_app",
    "make_app",
    "parse_keys",
    "parse_routes",
    "routes_from_file",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
