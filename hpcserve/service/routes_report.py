"""``GET /v1/report-data?since_s=&points=``: the data of ``hpcserve report`` (the work in
``hpcserve.api.report``): the caller's own deployments, idle jobs and usage, every user's for an admin."""

from __future__ import annotations

from aiohttp import web

from hpcserve.api import report
from hpcserve.errors import ValidationError
from hpcserve.report import DEFAULT_POINTS
from hpcserve.service.http import api_of, blocking, caller_of
from hpcserve.service.routes_admin import query_number  # the query's numbers, read as history reads them

routes = web.RouteTableDef()
DEFAULT_SINCE_S = 7 * 86400.0


@routes.get("/v1/report-data")
async def report_data(request: web.Request) -> web.Response:
    caller = caller_of(request)
    since_s = query_number(request, "since_s", DEFAULT_SINCE_S)
    points = query_number(request, "points", DEFAULT_POINTS)
    if not points.is_integer():
        raise ValidationError(f"points: expected a whole number, got {points:g}")
    answer = await blocking(report.report_data, api_of(request), caller, since_s, int(points))
    return web.json_response(answer)
