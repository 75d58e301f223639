"""Cluster reads and admin routes: JSON in and out, the work in ``hpcserve.api.admin``.

- ``GET /v1/history?partition=&since_s=&limit=``: queue samples, their count and the split over time;
- ``GET /v1/lost-work?since_s=``: training jobs evicted for replicas (lending: overlap), GPU-hours lost;
- ``GET /v1/plans?last=N``: the recent rebalance plans;
- ``POST /v1/admin/rebalance`` ``{"dry_run": bool}``: one rebalancer round (admins);
- ``POST /v1/admin/move`` ``{"node", "to", "dry_run"?, "grace_s"?}``: move a managed node (admins);
- ``POST /v1/admin/drain`` ``{"node", "reason"}``: drain a node for maintenance; its replicas move (admins).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from hpcserve.api import admin
from hpcserve.errors import ValidationError
from hpcserve.service.http import api_of, blocking, caller_of
from hpcserve.service.routes_deployments import body_of, optional_int

routes = web.RouteTableDef()
DEFAULT_SINCE_S = 86400.0
DEFAULT_LIMIT = 200


def query_number(request: web.Request, key: str, default: float) -> float:
    text = request.query.get(key)
    if text is None or text == "":
        return default
    try:
        return float(text)
    except ValueError:
        raise ValidationError(f"{key}: expected a number, got {text!r}") from None


def _text(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise ValidationError(f"{key}: required, as text")
    return value


def _flag(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise ValidationError(f"{key}: expected true or false, got {value!r}")
    return value


@routes.get("/v1/history")
async def history(request: web.Request) -> web.Response:
    caller = caller_of(request)
    since_s = query_number(request, "since_s", DEFAULT_SINCE_S)
    limit = int(query_number(request, "limit", DEFAULT_LIMIT))
    answer = await blocking(admin.history, api_of(request), caller, request.query.get("partition") or None,
                            since_s, limit)  # fmt: skip
    return web.json_response(answer)


@routes.get("/v1/lost-work")
async def lost_work(request: web.Request) -> web.Response:
    caller = caller_of(request)
    since_s = query_number(request, "since_s", DEFAULT_SINCE_S)
    return web.json_response(await blocking(admin.lost_work, api_of(request), caller, since_s))


@routes.get("/v1/plans")
async def plans(request: web.Request) -> web.Response:
    caller = caller_of(request)
    last = int(query_number(request, "last", admin.RECENT_PLANS))
    return web.json_response(await blocking(admin.plans, api_of(request), caller, last))


@routes.post("/v1/admin/rebalance")
async def rebalance(request: web.Request) -> web.Response:
    caller, body = caller_of(request), await body_of(request)
    answer = await blocking(admin.rebalance, api_of(request), caller, _flag(body, "dry_run"))
    return web.json_response(answer)


@routes.post("/v1/admin/move")
async def move(request: web.Request) -> web.Response:
    caller, body = caller_of(request), await body_of(request)
    args = (_text(body, "node"), _text(body, "to"), _flag(body, "dry_run"), optional_int(body, "grace_s"))
    return web.json_response(await blocking(admin.move, api_of(request), caller, *args))


@routes.post("/v1/admin/drain")
async def drain(request: web.Request) -> web.Response:
    caller, body = caller_of(request), await body_of(request)
    args = (_text(body, "node"), _text(body, "reason"))
    return web.json_response(await blocking(admin.drain, api_of(request), caller, *args))
