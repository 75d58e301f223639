"""The gateway's client for its hop to the replicas: HTTP/1.1 POST over kept-alive connections.

Why not aiohttp's ClientSession: on the 2-core bench box a bare aiohttp server+ClientSession proxy does
~0.35x nginx's requests/s, the client side being most of the cost. The hop has one shape (POST of a JSON
body to ``http://host:port``, an answer with Content-Length, chunked or read-to-close framing), so this
client does only that, on asyncio protocols: one write per request, response parsing on bytes.

- ``UpstreamPool.post`` returns a ``Response`` once its status and headers arrived. A connection that
  could not be made, or was lost before any byte of the answer, raises ``UpstreamError`` with
  ``retryable`` (nothing was answered; a reused keep-alive connection is first retried once fresh).
- ``read()`` gives the whole body; ``readany()`` the next decoded bytes as they arrive (b"" at the end).
  A silence longer than ``read_timeout`` raises ``ReadTimeout``; a connection lost mid-answer raises
  ``UpstreamError``. Reading pauses while more than ``HIGH_WATER`` bytes wait for the consumer.
- ``release()`` hands a fully read connection back to the pool (closing anything else); ``close()``
  drops the connection, which is how the replica learns the client went away.
Connections are capped at ``limit`` in all; idle ones are reused last-in first-out and closed after
``keepalive_s`` (under vLLM's, uvicorn's 5 s default).
"""

from __future__ import annotations

import asyncio
from collections import deque
from functools import lru_cache
from typing import cast
from urllib.parse import urlsplit

from hpcserve.serving.gateway.chunked import ChunkedDecoder, ChunkedError

HIGH_WATER = 256 * 1024
MAX_HEAD = 64 * 1024


class UpstreamError(Exception):
    """The replica failed; ``retryable`` when it cannot have answered any of the request."""

    def __init__(self, message: str, *, retryable: bool = False, connect: bool = False) -> None:
        super().__init__(message)
        self.retryable, self.connect = retryable, connect


class ReadTimeout(UpstreamError):
    """The replica was silent for longer than the read timeout."""


@lru_cache(maxsize=4096)
def host_port(url: str) -> tuple[str, int, bytes]:
    """(host, port, Host header value) of an ``http://`` base URL."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise UpstreamError(f"replica URL {url!r} is not http://host:port", connect=True)
    port = parts.port or 80
    return parts.hostname, port, parts.netloc.encode()


class _Connection(asyncio.Protocol):
    __slots__ = ("closed", "idle_since", "response", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # nothing asked: the connection is out of step
            self.close()
            return
        self.response.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is not None:
            self.response.lost(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Response:
    """One answer being received (see the module docstring)."""

    def __init__(self, pool: UpstreamPool, conn: _Connection, key: tuple[str, int]) -> None:
        self._pool, self._conn, self._key = pool, conn, key
        self.status = 0
        self.headers: dict[str, str] = {}
        self._head = bytearray()
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._paused = False
        self._left = -1  # Content-Length still to come; -1: not length-framed
        self._chunked: ChunkedDecoder | None = None
        self.complete = False
        self._keep_alive = True
        self.received_any = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._finished = False
        self._flow = False  # pause the replica when the consumer lags (streams only; read() takes all)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").partition(";")[0].strip().lower()

    # -- fed by the protocol --------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        self.received_any = True
        if self.status:
            self._body(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD:
                self._fail(UpstreamError("the replica's response headers are too long"))
            return
        rest = bytes(self._head[end + 4 :])
        try:
            self._parse_head(bytes(self._head[:end]))
        except (ValueError, IndexError):
            self._fail(UpstreamError("the replica's response head does not parse"))
            return
        self._head = bytearray()
        self._wake()
        if rest or self._left == 0:
            self._body(rest)

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ", 2)[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self._chunked = ChunkedDecoder()
        elif "content-length" in self.headers:
            self._left = int(self.headers["content-length"])
        self._keep_alive = self.headers.get("connection", "").lower() != "close" and (
            self._chunked is not None or self._left >= 0
        )

    def _body(self, data: bytes) -> None:
        if self._chunked is not None:
            try:
                pieces = self._chunked.feed(data)
            except ChunkedError as err:
                self._fail(UpstreamError(f"the replica's chunked framing is broken: {err}"))
                return
            for piece in pieces:
                self._push(piece)
            self.complete = self._chunked.done
        elif self._left >= 0:
            piece = data[: self._left]
            self._left -= len(piece)
            self._push(piece)
            self.complete = self._left == 0
        else:
            self._push(data)
        if self.complete:
            self._wake()

    def _push(self, piece: bytes) -> None:
        if not piece:
            return
        self._queue.append(piece)
        self._queued += len(piece)
        if self._flow and self._queued > HIGH_WATER and not self._paused and self._conn.transport is not None:
            self._paused = True
            self._conn.transport.pause_reading()
        self._wake()

    def lost(self, exc: Exception | None) -> None:
        if self.complete:
            return
        if self.status and self._chunked is None and self._left < 0:
            self.complete = True  # read-to-close framing: the close ends the body
            self._wake()
            return
        cause = f": {exc}" if exc else ""
        if self.received_any:
            self._fail(UpstreamError(f"the replica closed the connection mid-answer{cause}"))
        else:
            self._fail(
                UpstreamError(f"the replica closed the connection before answering{cause}", retryable=True)
            )

    def _fail(self, error: UpstreamError) -> None:
        self._error = self._error or error
        self._conn.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- used by the gateway --------------------------------------------------------------------------
    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        loop = self._pool.loop
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(self._pool.read_timeout, self._timed_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        if self._error is not None:
            raise self._error

    def _timed_out(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            self._fail(ReadTimeout(f"the replica sent nothing for {self._pool.read_timeout:g} s"))

    async def start(self) -> None:
        """Wait for the status line and headers."""
        while not self.status:
            await self._wait()

    async def readany(self) -> bytes:
        """The next body bytes as they arrive; b"" once the body is complete."""
        self._flow = True
        while not self._queue:
            if self.complete:
                return b""
            await self._wait()
        piece = self._queue.popleft()
        self._queued -= len(piece)
        if self._paused and self._queued < HIGH_WATER // 2 and self._conn.transport is not None:
            self._paused = False
            self._conn.transport.resume_reading()
        return piece

    async def read(self) -> bytes:
        """The whole body."""
        while not self.complete:
            await self._wait()
        body = b"".join(self._queue)
        self._queue.clear()
        self._queued = 0
        return body

    def release(self) -> None:
        """Done with the answer: the connection goes back to the pool if it is reusable, else closes."""
        if self._finished:
            return
        self._finished = True
        self._conn.response = None
        reusable = self.complete and self._keep_alive and self._error is None and not self._queue
        self._pool.give_back(self._key, self._conn, reusable)

    def close(self) -> None:
        """Drop the connection (the replica stops working on the request)."""
        self._conn.close()
        self.release()


class UpstreamPool:
    """Kept-alive connections per replica, ``limit`` in all (see the module docstring)."""

    def __init__(
        self, limit: int, connect_timeout: float, read_timeout: float, keepalive_s: float = 4.0
    ) -> None:
        self.connect_timeout, self.read_timeout, self.keepalive_s = connect_timeout, read_timeout, keepalive_s
        self._slots = asyncio.Semaphore(limit)
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the pool runs on (asked once: asking costs a getpid() call each time)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def post(self, url: str, path: str, body: bytes) -> Response:
        """Send a JSON POST and wait for the answer's head (see the module docstring for errors)."""
        host, port, netloc = host_port(url)
        request = b"".join((
            b"POST ", path.encode(), b" HTTP/1.1\r\nHost: ", netloc, b"\r\nContent-Type: application/json",
            b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\n\r\n", body,
        ))  # fmt: skip
        await self._slots.acquire()
        try:
            conn = self._take_idle((host, port))
            if conn is not None:
                try:
                    return await self._exchange((host, port), conn, request)
                except UpstreamError as err:
                    if not err.retryable:
                        raise
            return await self._exchange((host, port), await self._connect(host, port), request)
        except BaseException:
            self._slots.release()
            raise

    async def _exchange(self, key: tuple[str, int], conn: _Connection, request: bytes) -> Response:
        response = conn.response = Response(self, conn, key)
        assert conn.transport is not None
        conn.transport.write(request)
        try:
            await response.start()
        except BaseException:
            conn.close()
            conn.response = None
            raise
        return response

    async def _connect(self, host: str, port: int) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await self.loop.create_connection(_Connection, host, port)
        except (OSError, TimeoutError) as err:
            raise UpstreamError(
                f"cannot connect to {host}:{port}: {err or 'timed out'}", retryable=True, connect=True
            ) from None
        return conn

    def _take_idle(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        deadline = self.loop.time() - self.keepalive_s
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.idle_since > deadline:
                return conn
            conn.close()
        return None

    def give_back(self, key: tuple[str, int], conn: _Connection, reusable: bool) -> None:
        self._slots.release()
        if not reusable or conn.closed:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        self._idle.setdefault(key, []).append(conn)

    def sweep(self) -> None:
        """Close connections idle past ``keepalive_s`` or closed by the replica."""
        deadline = self.loop.time() - self.keepalive_s
        for key, conns in list(self._idle.items()):
            keep = []
            for conn in conns:
                if not conn.closed and conn.idle_since > deadline:
                    keep.append(conn)
                else:
                    conn.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
