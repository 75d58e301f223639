"""``GET /v1/usage?since_s=..&by=user|account|deployment|key|partition[&hpcserve_only=1][&jobs=1]``:
GPU-hours, cost and tokens. Callers see their own jobs and keys, admins everyone's
(``hpcserve.api.usage``)."""

from __future__ import annotations

from aiohttp import web

from hpcserve.api import usage as api_usage
from hpcserve.service.http import api_of, blocking, caller_of

routes = web.RouteTableDef()


@routes.get("/v1/usage")
async def usage(request: web.Request) -> web.Response:
    caller, api = caller_of(request), api_of(request)
    query = api_usage.parse_usage_query(request.query)
    return web.json_response(await blocking(api_usage.usage, api, caller, query))
