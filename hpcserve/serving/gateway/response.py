"""One HTTP/1.1 answer from a replica, received on an asyncio protocol (used by client.UpstreamPool).

``Response.feed`` parses the status line and headers, then the body by Content-Length, chunked framing
(chunked.py) or read-to-close; an interim 1xx answer is skipped; 204 and 304 have no body. Body bytes queue
up for ``read()`` or ``readany()``; for a stream (``readany``) reading from the replica pauses while more
than ``HIGH_WATER`` bytes wait. ``Connection`` sets TCP keepalive (``KEEPALIVE``) on every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from typing import TYPE_CHECKING, cast

from hpcserve.serving.gateway.chunked import ChunkedDecoder, ChunkedError

if TYPE_CHECKING:
    from hpcserve.serving.gateway.client import UpstreamPool

HIGH_WATER = 256 * 1024
MAX_HEAD = 64 * 1024
# A replica whose node vanished sends no FIN or RST: TCP keepalive probes find it out after 2 s of silence
# plus 2 unanswered probes 1 s apart. A live replica's kernel answers probes, however long its model thinks.
KEEPALIVE = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)] + [
    (socket.IPPROTO_TCP, getattr(socket, name), value)
    for name, value in (("TCP_KEEPIDLE", 2), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 2))
    if hasattr(socket, name)
]


class UpstreamError(Exception):
    """The replica failed; ``retryable`` when it cannot have answered any of the request."""

    def __init__(self, message: str, *, retryable: bool = False, connect: bool = False) -> None:
        super().__init__(message)
        self.retryable, self.connect = retryable, connect


class ReadTimeout(UpstreamError):
    """The replica was silent for longer than the read timeout."""


class BodyTooLarge(UpstreamError):
    """A non-streamed answer larger than the gateway takes."""


class Connection(asyncio.Protocol):
    __slots__ = ("closed", "idle_since", "response", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            for level, option, value in KEEPALIVE:
                with contextlib.suppress(OSError):
                    sock.setsockopt(level, option, value)

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

    __slots__ = ("_chunked", "_conn", "_error", "_finished", "_flow", "_head", "_keep_alive", "_key", "_left",
                 "_paused", "_pool", "_queue", "_queued", "_waiter", "complete", "headers", "received_any",
                 "status")  # fmt: skip

    def __init__(self, pool: UpstreamPool, conn: Connection, key: tuple[str, int]) -> None:
        self._pool, self._conn, self._key = pool, conn, key
        self.status = 0
        self.headers: dict[str, str] = {}
        self._head = b""
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
        if self.complete:  # bytes past the end: the connection is out of step
            self._keep_alive = False
        elif self.status:
            self._body(data)
        else:
            self._head_data(data)

    def _head_data(self, data: bytes) -> None:
        buf = self._head + data if self._head else data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self._head = buf
            if len(buf) > MAX_HEAD:
                self._fail(UpstreamError("the replica's response headers are too long"))
            return
        head, rest, self._head = buf[:end], buf[end + 4 :], b""
        try:
            self._parse_head(head)
        except (ValueError, IndexError):
            self._fail(UpstreamError("the replica's response head does not parse"))
            return
        if self.status < 200:  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            self.status, self.headers = 0, {}
            if rest:
                self._head_data(rest)
            return
        self._wake()
        if rest or self._left == 0:
            self._body(rest)

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ", 2)[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        if self.status in (204, 304):
            self._left = 0
        elif "chunked" in self.headers.get("transfer-encoding", "").lower():
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
            if len(data) > self._left:  # more than Content-Length: do not reuse the connection
                self._keep_alive = False
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
    async def wait(self) -> None:
        """Until something arrives (or ``read_timeout`` passes: ReadTimeout); raises the answer's error."""
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

    async def readany(self) -> bytes:
        """The next body bytes as they arrive; b"" once the body is complete."""
        self._flow = True
        while not self._queue:
            if self.complete:
                return b""
            await self.wait()
        piece = self._queue.popleft()
        self._queued -= len(piece)
        if self._paused and self._queued < HIGH_WATER // 2 and self._conn.transport is not None:
            self._paused = False
            self._conn.transport.resume_reading()
        return piece

    async def read(self, limit: int) -> bytes:
        """The whole body; ``BodyTooLarge`` (the connection dropped) as soon as it is known to pass
        ``limit`` bytes."""
        if self._queued + max(self._left, 0) > limit:  # Content-Length says so
            raise self._too_large(limit)
        while not self.complete:
            if self._queued > limit:
                raise self._too_large(limit)
            await self.wait()
        if self._queued > limit:
            raise self._too_large(limit)
        return self.body()

    def _too_large(self, limit: int) -> BodyTooLarge:
        self._conn.close()
        return BodyTooLarge(f"the replica's answer is larger than {limit} bytes (the gateway's cap)")

    def body(self) -> bytes:
        """The body received so far (all of it once ``complete``), taken out of the response."""
        body = b"".join(self._queue) if len(self._queue) != 1 else self._queue[0]
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
        if reusable and self._paused and self._conn.transport is not None:
            self._conn.transport.resume_reading()
        self._pool.give_back(self._key, self._conn, reusable)

    def close(self) -> None:
        """Drop the connection (the replica stops working on the request)."""
        self._conn.close()
        self.release()
