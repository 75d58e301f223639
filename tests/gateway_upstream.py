"""A tiny OpenAI-style upstream for the gateway tests (not the engine simulator): answers at once, streams
``chunks`` events (each written on its own), holds requests while ``hold`` is set, and records the bodies
it got and their Authorization headers. ``python tests/gateway_upstream.py [--stall]`` serves one on a free
port, prints the port and, with ``--stall``, stops after two events (streamed) or half the body (not
streamed) until it is killed.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

USAGE_PROMPT = 5


@dataclass
class Upstream:
    name: str = "up"
    chunks: int = 3
    stall: bool = False
    hold: asyncio.Event | None = None
    bodies: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)  # each request's Authorization header
    active: int = 0


UP = web.AppKey("up", Upstream)


def _event(data: object) -> bytes:
    return b"data: " + msgspec.json.encode(data) + b"\n\n"


async def _answer(request: web.Request) -> web.StreamResponse:
    up: Upstream = request.app[UP]
    body = msgspec.json.decode(await request.read())
    up.bodies.append(body)
    up.auth.append(request.headers.get("Authorization"))
    up.active += 1
    try:
        if up.hold is not None:
            await up.hold.wait()
        return await (_stream(request, up, body) if body.get("stream") else _whole(request, up, body))
    finally:
        up.active -= 1


async def _whole(request: web.Request, up: Upstream, body: dict[str, Any]) -> web.StreamResponse:
    data = msgspec.json.encode(
        {"id": "x", "choices": [{"index": 0, "text": "tok " * up.chunks}], "replica": up.name,
         "usage": {"prompt_tokens": USAGE_PROMPT, "completion_tokens": up.chunks}}
    )  # fmt: skip
    if not up.stall:
        return web.Response(body=data, content_type="application/json")
    out = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": str(len(data))})
    await out.prepare(request)
    await out.write(data[: len(data) // 2])
    await asyncio.sleep(3600)
    return out


async def _stream(request: web.Request, up: Upstream, body: dict[str, Any]) -> web.StreamResponse:
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await out.prepare(request)
    for i in range(up.chunks):
        await out.write(_event({"id": "x", "choices": [{"index": 0, "text": f"t{i} "}]}))
        await asyncio.sleep(0.001)
        if up.stall and i == 1:
            await asyncio.sleep(3600)
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": USAGE_PROMPT, "completion_tokens": up.chunks}
        await out.write(_event({"id": "x", "choices": [], "usage": usage}))
    await out.write(b"data: [DONE]\n\n")
    await out.write_eof()
    return out


def upstream_app(up: Upstream) -> web.Application:
    app = web.Application()
    app[UP] = up
    app.router.add_post("/v1/chat/completions", _answer)
    app.router.add_post("/v1/completions", _answer)
    return app


async def _main(stall: bool) -> None:
    runner = web.AppRunner(upstream_app(Upstream(stall=stall, chunks=50)), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_main("--stall" in sys.argv))
