"""The gateway: one stable OpenAI-compatible endpoint in front of every deployment's replicas.

``make_app(config, source, keys=..., report=..., usage_sink=...)`` builds the aiohttp app; ``source`` is a
``refresh() -> Mapping[str, DeploymentRoute]`` (``StaticRoutes``, ``routes_from_file``, or the database).
Modules: routes (snapshot types, sources), routing (pure replica choice), admission (pure request checks),
keys (API keys, token buckets), buffer (scale-from-zero wait), stats and metrics (counters, callbacks,
Prometheus), client, response and chunked (the HTTP/1.1 hop to replicas), upstream and proxy (relaying),
state, app (``make_app``), serve (``run_gateway``: uvloop, file limits).
"""

from hpcserve.serving.gateway.app import make_app
from hpcserve.serving.gateway.config import GatewayConfig
from hpcserve.serving.gateway.keys import ApiKey, hash_key, load_keys, parse_keys
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

__all__ = [
    "ApiKey",
    "DeploymentRoute",
    "Endpoint",
    "GatewayConfig",
    "GatewaySample",
    "Refresh",
    "Report",
    "Routes",
    "StaticRoutes",
    "UsageRow",
    "UsageSink",
    "hash_key",
    "load_keys",
    "load_routes",
    "make_app",
    "parse_keys",
    "parse_routes",
    "routes_from_file",
]
