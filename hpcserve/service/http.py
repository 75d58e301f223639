"""The API's aiohttp application: who is calling (the kernel or munge says), and errors as one JSON line.

Transports:
- ``unix``: the caller is the uid the kernel gives for the connection (``SO_PEERCRED``);
- ``tcp``: the caller is the uid of a munge credential made for exactly this request
  (``Authorization: Munge ...``, see ``munge.py``). Without one the request has no caller: only endpoints
  that take another proof (a replica's secret) answer it.

Route modules (``routes_*.py``) each export ``routes: web.RouteTableDef``; handlers read the caller with
``caller_of(request)`` and the API context with ``api_of(request)``, and run blocking work (the store,
Slurm) with ``blocking(...)``. An ``HpcserveError`` raised anywhere becomes ``{"error": "one line",
"exit_code": N}`` with the status that fits it; the CLI prints the line and exits with the code.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware

from hpcserve.api.errors import Forbidden as Forbidden  # re-exported: handlers raise them
from hpcserve.api.errors import Unauthenticated as Unauthenticated
from hpcserve.errors import ConfigError, HpcserveError, ValidationError
from hpcserve.service.munge import SCHEME, MungeError, check_request

if TYPE_CHECKING:
    from hpcserve.api.caller import Caller
    from hpcserve.api.context import ApiContext

log = logging.getLogger("hpcserve.api")
Transport = Literal["unix", "tcp"]
T = TypeVar("T")
API_KEY: web.AppKey[ApiContext] = web.AppKey("api")
CALLER_KEY: web.RequestKey[Caller] = web.RequestKey("caller")
MAX_BODY = 1 << 20  # a deployment spec or a key request is a few kB
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def api_of(request: web.Request) -> ApiContext:
    return request.app[API_KEY]


def caller_of(request: web.Request) -> Caller:
    """The authenticated caller; 401 when the request carries no identity."""
    caller = caller_or_none(request)
    if caller is None:
        raise Unauthenticated(
            "no identity: call the service on its Unix socket, or over TCP with a munge credential"
        )
    return caller


def caller_or_none(request: web.Request) -> Caller | None:
    """The kernel's or munge's word on who calls; None over TCP without a munge credential."""
    return request.get(CALLER_KEY)


async def blocking(func: Callable[..., T], *args: Any) -> T:
    """``func(*args)`` on a worker thread: the store and Slurm block, the event loop must not."""
    return await asyncio.to_thread(func, *args)


def make_api_app(
    api: ApiContext, tables: Sequence[web.RouteTableDef], transport: Transport
) -> web.Application:
    app = web.Application(middlewares=[_errors, _identity(transport)], client_max_size=MAX_BODY)
    app[API_KEY] = api
    app.router.add_get("/v1/whoami", _whoami)
    for table in tables:
        app.router.add_routes(table)
    return app


async def _whoami(request: web.Request) -> web.Response:
    from hpcserve.api.caller import is_admin

    caller = caller_of(request)
    admin = is_admin(caller, api_of(request).site.admins)
    return web.json_response({"user": caller.user, "uid": caller.uid, "groups": sorted(caller.groups),
                              "admin": admin})  # fmt: skip


def _identity(transport: Transport) -> Middleware:
    @web.middleware
    async def identity(request: web.Request, handler: Handler) -> web.StreamResponse:
        uid = peer_uid(request) if transport == "unix" else await _munge_uid(request)
        if uid is not None:
            from hpcserve.api.caller import caller_for_uid

            request[CALLER_KEY] = await blocking(caller_for_uid, uid)
        return await handler(request)

    return identity


def peer_uid(request: web.Request) -> int | None:
    """The uid of the process at the other end of a Unix socket connection (``SO_PEERCRED``)."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


async def _munge_uid(request: web.Request) -> int | None:
    header = request.headers.get("Authorization", "")
    if not header.startswith(SCHEME):
        return None
    body = await request.read()
    return await blocking(check_request, header[len(SCHEME) :].strip(), request.method, request.path_qs, body)


def status_for(exc: HpcserveError) -> int:
    """The HTTP status that fits an error (the CLI exits with the error's own code either way)."""
    from hpcserve.store.errors import DeploymentExists, NotFound, NotOwner, ServedNameTaken

    for kinds, status in (
        ((Unauthenticated, MungeError), 401),
        ((Forbidden, NotOwner), 403),
        ((NotFound,), 404),
        ((DeploymentExists, ServedNameTaken), 409),
        ((ValidationError, ConfigError), 400),
    ):
        if isinstance(exc, kinds):
            return status
    return 422 if exc.exit_code == 2 else 500


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except HpcserveError as exc:
        return error_response(status_for(exc), str(exc), exc.exit_code)
    except web.HTTPException:
        raise
    except Exception as exc:  # a bug: one line for the caller, the traceback in the service's log
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, f"internal error in the service: {type(exc).__name__} (see its log)", 70)


def error_response(status: int, message: str, exit_code: int = 1) -> web.Response:
    return web.json_response({"error": message.splitlines()[0] if message else "", "exit_code": exit_code},
                             status=status)  # fmt: skip
