"""The gateway in front of a raw asyncio server on loopback that answers malformed HTTP/1.1: each malformed
answer is a clean 502 (non-streamed) or a stream ending in one error event, the gateway closes that
connection, and the next request works on a fresh connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import msgspec
import pytest
from aiohttp import ClientSession

from hpcserve.serving.gateway import DeploymentRoute, Endpoint, StaticRoutes, make_app
from hpcserve.serving.gateway.response import MAX_HEAD, MAX_INTERIM
from tests.test_gateway import FAST, KEY, KEYS, serving

GOOD = b'{"choices":[{"index":0,"text":"ok"}],"usage":{"prompt_tokens":1,"completion_tokens":1}}'
JSON = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
LEN2 = JSON + b"Content-Length: 2\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
SSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
EVENT = b'data: {"choices":[{"index":0,"text":"a"}]}\n\n'
FIRST = f"{len(EVENT):x}\r\n".encode() + EVENT + b"\r\n"
MALFORMED = {
    "status 1000": b"HTTP/1.1 1000 OK\r\nContent-Length: 2\r\n\r\n{}",
    "status 600": b"HTTP/1.1 600 OK\r\nContent-Length: 2\r\n\r\n{}",
    "bad status line": b"HTTP/1.1 200OK\r\nContent-Length: 2\r\n\r\n{}",
    "chunk size 0x5": JSON + b"Transfer-Encoding: chunked\r\n\r\n0x2\r\n{}\r\n0\r\n\r\n",
    "chunk size +5": JSON + b"Transfer-Encoding: chunked\r\n\r\n+2\r\n{}\r\n0\r\n\r\n",
    "chunk size overflow": JSON + b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 20 + b"\r\n{}\r\n0\r\n\r\n",
    "two lengths": JSON + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    "length and chunked": LEN2 + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "bytes after the answer": LEN2 + b"\r\n{}HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "over-long head": JSON + b"X-Big: " + b"x" * (MAX_HEAD + 1) + b"\r\nContent-Length: 2\r\n\r\n{}",
    "interim flood": CONTINUE * (MAX_INTERIM * 50) + LEN2 + b"\r\n{}",
}  # fmt: skip
MALFORMED_STREAMS = {  # written after the first event, once the gateway relays the stream
    "chunk size 0x5": b"0x5\r\nhello\r\n0\r\n\r\n",
    "chunk size -1": b"-1\r\n",
    "chunk longer than its size": b"2\r\nabc\r\n0\r\n\r\n",
    "over-long trailer": b"0\r\nX-Big: " + b"x" * (MAX_HEAD + 1) + b"\r\n\r\n",
    "bytes after the end": b"0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
}


@dataclass
class RawReplica:
    """Answers each request with the next of ``answers`` (then good ones), each piece written 50 ms after
    the one before (b"" closes the connection); notes which connection each request came on and which the
    gateway closed."""

    answers: list[tuple[bytes, ...]] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)  # connection number per request
    closed: set[int] = field(default_factory=set)
    connections: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                body = msgspec.json.decode(await reader.readexactly(length))
                self.requests.append(number)
                pieces = self.answers.pop(0) if self.answers else (self.good(body.get("stream", False)),)
                for i, piece in enumerate(pieces):
                    await asyncio.sleep(0.05 if i else 0)
                    if not piece:  # b"": the replica closes the connection
                        return
                    writer.write(piece)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed.add(number)
        finally:
            writer.close()

    @staticmethod
    def good(stream: bool) -> bytes:
        if not stream:
            return JSON + f"Content-Length: {len(GOOD)}\r\n\r\n".encode() + GOOD
        done = b"data: [DONE]\n\n"
        return SSE + FIRST + f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n"


@asynccontextmanager
async def gateway_before(replica: RawReplica) -> AsyncIterator[tuple[str, ClientSession]]:
    server = await asyncio.start_server(replica.serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    routes = StaticRoutes.of(DeploymentRoute("m", (Endpoint("m", 0, url),)))
    try:
        async with serving(make_app(FAST, routes, keys=KEYS)) as gw, ClientSession() as http:
            yield gw, http
    finally:
        server.close()


async def _post(http: ClientSession, gw: str, stream: bool) -> tuple[int, bytes]:
    body = {"model": "m", "prompt": "hi", "stream": stream}
    headers = {"Authorization": f"Bearer {KEY}"}
    async with http.post(gw + "/v1/completions", json=body, headers=headers) as resp:
        return resp.status, await asyncio.wait_for(resp.read(), 5)


async def _closed_by_gateway(replica: RawReplica, number: int) -> bool:
    for _ in range(100):
        if number in replica.closed:
            return True
        await asyncio.sleep(0.01)
    return False


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_answer_is_a_clean_502_and_the_next_request_works(case: str) -> None:
    async def scenario() -> None:
        replica = RawReplica()
        async with gateway_before(replica) as (gw, http):
            assert await _post(http, gw, False) == (200, GOOD)  # a kept-alive connection to reuse
            replica.answers.append((MALFORMED[case],))
            status, body = await _post(http, gw, False)
            error = msgspec.json.decode(body)["error"]
            assert (status, error["code"]) == (502, "upstream_error"), body
            assert "malformed" in error["message"] or "after its answer" in error["message"], error
            bad = replica.requests[-1]
            assert await _closed_by_gateway(replica, bad)
            assert await _post(http, gw, False) == (200, GOOD)
            assert replica.requests[-1] != bad and replica.requests[:2] == [1, 1]

    asyncio.run(scenario())


@pytest.mark.parametrize("case", sorted(MALFORMED_STREAMS))
def test_a_malformed_stream_ends_in_one_error_event_and_the_next_request_works(case: str) -> None:
    async def scenario() -> None:
        replica = RawReplica([(SSE + FIRST, MALFORMED_STREAMS[case])])
        async with gateway_before(replica) as (gw, http):
            status, body = await _post(http, gw, True)
            assert status == 200 and body.startswith(EVENT), body
            (last,) = body.removeprefix(EVENT).split(b"\n\n")[:-1]
            error = msgspec.json.decode(last.removeprefix(b"data: "))["error"]
            assert error["code"] == "upstream_broken", error
            assert "malformed" in error["message"] or "after its answer" in error["message"], error
            assert await _closed_by_gateway(replica, 1)
            status, body = await _post(http, gw, True)
            assert (status, body) == (200, EVENT + b"data: [DONE]\n\n") and replica.requests == [1, 2]

    asyncio.run(scenario())


def test_read_to_close_and_connection_close_answers_are_not_reused() -> None:
    async def scenario() -> None:
        replica = RawReplica()
        async with gateway_before(replica) as (gw, http):
            replica.answers = [
                (JSON + b"Connection: close\r\nContent-Length: 2\r\n\r\n{}",),
                (JSON + b"\r\n{", b'"a": 1}', b""),  # neither length nor chunked: read to close
            ]
            assert await _post(http, gw, False) == (200, b"{}")
            assert await _post(http, gw, False) == (200, b'{"a": 1}')
            assert await _post(http, gw, False) == (200, GOOD)
            assert await _post(http, gw, False) == (200, GOOD)
            assert replica.requests == [1, 2, 3, 3]  # fresh after each; the good one kept alive

    asyncio.run(scenario())
