"""Replica routes: ``POST /v1/replicas/announce`` with ``{deployment, index, job_id, host, port}`` and
``Authorization: Replica <secret>`` -> ``{"deployment", "index", "url"}``. The checks are in
``hpcserve.api.replicas``; over TCP this is the one route that needs no munge credential (the secret is
the proof)."""

from __future__ import annotations

from aiohttp import web

from hpcserve.api import replicas
from hpcserve.service.http import Unauthenticated, api_of, blocking, caller_or_none
from hpcserve.service.routes_deployments import body_of
from hpcserve.serving.replica import SECRET_SCHEME

routes = web.RouteTableDef()


def secret_of(request: web.Request) -> str:
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    if scheme != SECRET_SCHEME or not secret.strip():
        raise Unauthenticated(f"announce: expected `Authorization: {SECRET_SCHEME} <secret>`")
    return secret.strip()


@routes.post("/v1/replicas/announce")
async def announce(request: web.Request) -> web.Response:
    secret = secret_of(request)
    note = replicas.parse_announce(await body_of(request))
    caller = caller_or_none(request)
    replica = await blocking(replicas.announce, api_of(request), note, secret, caller)
    return web.json_response({"deployment": replica.deployment, "index": replica.index, "url": replica.url})
