"""The replica hop's parser is one per connection, reused across its answers; read timeouts share one timer
per pool (response.py, client.py)."""

from __future__ import annotations

import asyncio

import pytest

from hpcserve.serving.gateway.client import UpstreamPool
from hpcserve.serving.gateway.response import Connection, ReadTimeout, Response, UpstreamError

KEY = ("h", 1)
FIRST = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nServer: x\r\nContent-Length: 5\r\n\r\nfirst"
SECOND = (
    b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\n"
)


class FakeTransport:
    closed = False

    def get_extra_info(self, name: str) -> None:
        return None

    def close(self) -> None:
        self.closed = True


def _connected(pool: UpstreamPool) -> Connection:
    conn = Connection()
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    pool._active = 2  # as if post() had taken a slot for each answer
    return conn


def test_answers_on_one_connection_share_its_parser_and_keep_their_own_heads() -> None:
    async def scenario() -> None:
        pool = UpstreamPool(4, connect_timeout=1.0, read_timeout=1.0)
        conn = _connected(pool)
        parser = conn.parser
        first = Response(pool, conn, KEY)
        conn.data_received(FIRST[:30])
        conn.data_received(FIRST[30:])
        assert (first.status, first.content_type, await first.read(100)) == (
            200,
            "application/json",
            b"first",
        )
        assert first.headers == {"content-type": "application/json", "server": "x", "content-length": "5"}
        first.release()
        second = Response(pool, conn, KEY)
        conn.data_received(SECOND)
        assert (second.status, second.content_type, await second.read(100)) == (404, "text/plain", b"abc")
        assert "content-length" not in second.headers and second.headers["transfer-encoding"] == "chunked"
        second.release()
        assert conn.parser is parser and not conn.closed

    asyncio.run(scenario())


def test_bytes_after_an_answer_on_a_reused_parser_are_refused_and_drop_it() -> None:
    async def scenario() -> None:
        pool = UpstreamPool(4, connect_timeout=1.0, read_timeout=1.0)
        conn = _connected(pool)
        first = Response(pool, conn, KEY)
        conn.data_received(FIRST)
        assert await first.read(100) == b"first"
        first.release()
        assert not conn.closed
        response = Response(pool, conn, KEY)
        conn.data_received(FIRST + b"HTTP/1.1 200 OK\r\n")  # a second answer nobody asked for
        with pytest.raises(UpstreamError, match="malformed: bytes after the answer"):
            await response.read(100)
        assert conn.closed and conn.parser is None

    asyncio.run(scenario())


def test_waits_time_out_oldest_first_on_one_timer_and_answers_that_arrive_do_not() -> None:
    """Three answers waited for 40 ms apart with a 0.2 s read timeout: the silent ones time out, each about
    0.2 s after its own wait began; the one answered meanwhile does not; no timer is left armed."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pool = UpstreamPool(4, connect_timeout=1.0, read_timeout=0.2)
        conns = {name: _connected(pool) for name in "abc"}
        started = loop.time()
        ended: dict[str, float] = {}

        async def wait(name: str, delay: float) -> None:
            await asyncio.sleep(delay)
            response = Response(pool, conns[name], KEY)
            try:
                await response.read(100)
                ended[name] = -1.0  # answered
            except ReadTimeout:
                ended[name] = loop.time() - started - delay

        async def answer_b() -> None:
            await asyncio.sleep(0.09)  # b's wait began at 0.04: 50 ms into it
            conns["b"].data_received(FIRST)

        await asyncio.gather(wait("a", 0.0), wait("b", 0.04), wait("c", 0.08), answer_b())
        assert ended["b"] == -1.0
        assert 0.2 <= ended["a"] < 0.4 and 0.2 <= ended["c"] < 0.4
        assert conns["a"].closed and conns["c"].closed and not conns["b"].closed
        assert not pool._waits and pool._watch is None

    asyncio.run(scenario())
