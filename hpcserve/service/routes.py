"""The API's route tables: one module per area, each exporting ``routes`` (an aiohttp ``RouteTableDef``)."""

from __future__ import annotations

import importlib
import importlib.util

from aiohttp import web

ROUTE_MODULES = (
    "hpcserve.service.routes_deployments",  # deployments: create, list, show, scale, share, remove, logs
    "hpcserve.service.routes_keys",  # API keys: create, list, revoke; their usage per day
    "hpcserve.service.routes_usage",  # usage: GPU-hours, cost and tokens per user, account, deployment...
    "hpcserve.service.routes_replicas",  # replicas announcing themselves with their secret
    "hpcserve.service.routes_admin",  # history and plans (read); rebalance, move, drain (admins)
    "hpcserve.service.routes_report",  # the data of `hpcserve report` (own; everyone's for admins)
    "hpcserve.service.routes_telemetry",  # GPU telemetry: jobs report, users read theirs; idle jobs (admins)
)


def route_tables() -> list[web.RouteTableDef]:
    tables = []
    for name in ROUTE_MODULES:
        if importlib.util.find_spec(name) is not None:
            tables.append(importlib.import_module(name).routes)
    return tables
