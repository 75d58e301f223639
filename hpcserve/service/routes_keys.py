"""API keys and their usage: ``POST /v1/keys`` (create; the key is in this answer only), ``GET /v1/keys``
(``?all=1``: every user's, admins only), ``DELETE /v1/keys/{id}``, ``GET /v1/keys/usage`` (``?since=DAYS``,
``?all=1``; GPU-hours and cost are ``GET /v1/usage``, in routes_usage). The logic and its ownership rules
are in ``hpcserve.api.keys``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from hpcserve.api import keys
from hpcserve.errors import ValidationError
from hpcserve.service.http import api_of, blocking, caller_of

routes = web.RouteTableDef()


@routes.post("/v1/keys")
async def create_key(request: web.Request) -> web.Response:
    caller, api = caller_of(request), api_of(request)
    wanted = keys.parse_key_request(await _body(request))
    record, key = await blocking(keys.create_key, api, caller, wanted)
    return web.json_response({**keys.key_view(record), "key": key}, status=201)


@routes.get("/v1/keys")
async def list_keys(request: web.Request) -> web.Response:
    caller, api = caller_of(request), api_of(request)
    found = await blocking(keys.list_keys, api, caller, _flag(request, "all"))
    return web.json_response([keys.key_view(k) for k in found])


@routes.delete("/v1/keys/{key_id}")
async def revoke_key(request: web.Request) -> web.Response:
    caller, api = caller_of(request), api_of(request)
    record = await blocking(keys.revoke_key, api, caller, request.match_info["key_id"])
    return web.json_response(keys.key_view(record))


@routes.get("/v1/keys/usage")
async def usage(request: web.Request) -> web.Response:
    caller, api = caller_of(request), api_of(request)
    since = _number(request, "since")
    rows = await blocking(keys.usage, api, caller, since, _flag(request, "all"))
    return web.json_response([keys.usage_view(r) for r in rows])


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise ValidationError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise ValidationError("the request body must be a JSON object")
    return body


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("1", "true", "yes")


def _number(request: web.Request, name: str) -> float | None:
    value = request.query.get(name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise ValidationError(f"{name}: {value!r} is not a number of days") from None
