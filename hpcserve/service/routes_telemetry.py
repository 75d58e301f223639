"""GPU telemetry routes; the rules are in ``hpcserve.api.telemetry``.

- ``POST /v1/telemetry``: ``{"job_id", "samples": [...], "deployment", "index"}`` from a replica (with
  ``Authorization: Replica <secret>``; over TCP that is its only proof) or from the job's own user ->
  ``{"stored": n}``;
- ``GET /v1/telemetry/jobs``: the newest readings of each of the caller's jobs (every job for an admin),
  with its idle flag -> ``{"jobs": [...]}``;
- ``GET /v1/idle``: the jobs flagged idle and the GPU-hours they wasted (admins) -> ``{"flags": [...],
  "gpu_hours_wasted": h}``.
"""

from __future__ import annotations

from aiohttp import web

from hpcserve.api import telemetry
from hpcserve.service.http import api_of, blocking, caller_of, caller_or_none
from hpcserve.service.routes_deployments import body_of
from hpcserve.serving.replica import SECRET_SCHEME

routes = web.RouteTableDef()


def replica_secret(request: web.Request) -> str | None:
    """The secret of ``Authorization: Replica <secret>``; None for any other (or no) Authorization."""
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    return secret.strip() or None if scheme == SECRET_SCHEME else None


@routes.post("/v1/telemetry")
async def report(request: web.Request) -> web.Response:
    api = api_of(request)
    parsed = telemetry.parse_report(await body_of(request), api.clock())
    caller = caller_or_none(request)
    stored = await blocking(telemetry.store_report, api, parsed, replica_secret(request), caller)
    return web.json_response({"stored": stored})


@routes.get("/v1/telemetry/jobs")
async def latest(request: web.Request) -> web.Response:
    rows = await blocking(telemetry.latest_by_job, api_of(request), caller_of(request))
    return web.json_response({"jobs": rows})


@routes.get("/v1/idle")
async def idle(request: web.Request) -> web.Response:
    found = await blocking(telemetry.admin_idle_jobs, api_of(request), caller_of(request))
    return web.json_response(found)
