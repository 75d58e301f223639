"""Deployment routes: JSON in and out, the work in ``hpcserve.api.deployments``.

- ``GET /v1/deployments``: every deployment (rows as ``hpcserve deployments --json`` prints them);
- ``POST /v1/deployments``: ``{"values": {...}, "base": {...} | null}`` (the CLI's flags, plus ``account``
  and ``shares``; ``base``: a spec file's fields) -> the new row;
- ``GET /v1/deployments/{name}``, ``PATCH`` (``replicas``, ``min_replicas``, ``max_replicas``) -> the row;
  ``DELETE`` -> ``{"name", "removed", "draining"}``;
- ``POST /v1/deployments/{name}/share``: ``{"shares": [USER | @GROUP | all, ...]}`` (replaces) -> the row;
- ``GET /v1/deployments/{name}/logs?replica=N&offset=FILE:BYTES...`` -> ``{"files": [...]}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from hpcserve.api import deployments
from hpcserve.errors import ValidationError
from hpcserve.service.http import api_of, blocking, caller_of

routes = web.RouteTableDef()


async def body_of(request: web.Request) -> dict[str, Any]:
    """The request's JSON object (an empty body is ``{}``); 400 for anything else."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise ValidationError("request body: not JSON (fix: send a JSON object)") from None
    if not isinstance(body, dict):
        raise ValidationError("request body: expected a JSON object")
    return body


def optional_int(body: Mapping[str, Any], key: str, low: int = 0) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValidationError(f"{key}: expected a whole number of at least {low}, got {value!r}")
    return value


def optional_mapping(body: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = body.get(key)
    if value is not None and not isinstance(value, dict):
        raise ValidationError(f"{key}: expected a JSON object")
    return value


@routes.get("/v1/deployments")
async def list_deployments(request: web.Request) -> web.Response:
    rows = await blocking(deployments.list_rows, api_of(request), caller_of(request))
    return web.json_response(rows)


@routes.post("/v1/deployments")
async def create_deployment(request: web.Request) -> web.Response:
    caller, body = caller_of(request), await body_of(request)
    values, base = optional_mapping(body, "values") or {}, optional_mapping(body, "base")
    row = await blocking(deployments.create, api_of(request), caller, values, base)
    return web.json_response(row, status=201)


@routes.get("/v1/deployments/{name}")
async def show_deployment(request: web.Request) -> web.Response:
    row = await blocking(deployments.show, api_of(request), caller_of(request), request.match_info["name"])
    return web.json_response(row)


@routes.patch("/v1/deployments/{name}")
async def scale_deployment(request: web.Request) -> web.Response:
    caller, body = caller_of(request), await body_of(request)
    counts = (optional_int(body, "replicas"), optional_int(body, "min_replicas"),
              optional_int(body, "max_replicas", low=1))  # fmt: skip
    row = await blocking(deployments.scale, api_of(request), caller, request.match_info["name"], *counts)
    return web.json_response(row)


@routes.delete("/v1/deployments/{name}")
async def remove_deployment(request: web.Request) -> web.Response:
    answer = await blocking(
        deployments.remove, api_of(request), caller_of(request), request.match_info["name"]
    )
    return web.json_response(answer)


@routes.post("/v1/deployments/{name}/share")
async def share_deployment(request: web.Request) -> web.Response:
    caller, body = caller_of(request), await body_of(request)
    row = await blocking(deployments.share, api_of(request), caller, request.match_info["name"],
                         body.get("shares"))  # fmt: skip
    return web.json_response(row)


@routes.get("/v1/deployments/{name}/logs")
async def deployment_logs(request: web.Request) -> web.Response:
    caller = caller_of(request)
    replica = optional_int({"replica": _int_param(request, "replica")}, "replica")
    offsets = dict(_offset(item) for item in request.query.getall("offset", []))
    answer = await blocking(deployments.logs, api_of(request), caller, request.match_info["name"], replica,
                            offsets)  # fmt: skip
    return web.json_response(answer)


def _int_param(request: web.Request, key: str) -> int | None:
    text = request.query.get(key)
    if text is None or text == "":
        return None
    if not text.isdigit():
        raise ValidationError(f"{key}: expected a whole number, got {text!r}")
    return int(text)


def _offset(item: str) -> tuple[str, int]:
    """``FILE:BYTES`` -> (file, bytes)."""
    name, sep, count = item.rpartition(":")
    if not sep or not name or not count.isdigit():
        raise ValidationError(f"offset: {item!r} is not FILE:BYTES")
    return name, int(count)
