"""One HTTP/1.1 answer from a replica, parsed by llhttp (httptools) on an asyncio protocol (client.py).

``Response.feed`` hands the bytes to ``httptools.HttpResponseParser``, which frames the body by
Content-Length, chunked coding or read-to-close; an interim 1xx answer is skipped (at most
``MAX_INTERIM``); 204 and 304 have no body. Body bytes queue up for ``read()`` or ``readany()``; for a
stream (``readany``) reading from the replica pauses while more than ``HIGH_WATER`` bytes wait.

Strict, because a replica that answers out of step must never leave its bytes for the next request:
anything llhttp refuses (a bad status line, a bad chunk size such as ``0x5``, ``+5`` or one that
overflows, two Content-Lengths, Content-Length with Transfer-Encoding), a status outside 100-599, an
HTTP version other than 1.0/1.1, a Transfer-Encoding other than ``chunked``, a protocol switch, a head
over ``MAX_HEAD`` bytes, more than ``MAX_INTERIM`` interim answers, or any byte after the answer ends
(llhttp skips a bare CRLF there, as between pipelined answers) closes the connection and becomes an
``UpstreamError``: the proxy's 502, or an error event in a stream. ``Connection`` sets TCP keepalive
(``KEEPALIVE``) on every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from typing import TYPE_CHECKING, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

if TYPE_CHECKING:
    from hpcserve.serving.gateway.client import UpstreamPool

HIGH_WATER = 256 * 1024
MAX_HEAD = 64 * 1024  # bytes of status line, headers and trailers together
MAX_INTERIM = 8  # 1xx answers before the real one
HEAD_TOO_LONG = f"the head is longer than {MAX_HEAD} bytes"
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


class _Refused(ValueError):
    """Raised inside a parser callback: what is wrong with the answer (llhttp itself accepts it)."""


def _reason(err: HttpParserError) -> str:
    """What llhttp refused, or what a callback refused (``_Refused``, raised inside llhttp)."""
    return str(err.__context__ if isinstance(err.__context__, _Refused) else err)


class Connection(asyncio.Protocol):
    """A kept-alive connection to a replica and its parser: one llhttp parser for every answer on the
    connection (llhttp starts the next message once one is complete), whose callbacks are this object's
    ``on_*`` methods, working on ``response``, the answer being received. The parser and the connection
    hold each other: ``close`` and ``connection_lost`` drop the parser, so no cycle outlives the
    connection (one per connection, not one per answer)."""

    __slots__ = ("closed", "idle_since", "parser", "response", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.closed = False
        self.idle_since = 0.0
        self.parser: HttpResponseParser | None = HttpResponseParser(self)

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
        self.parser = None
        if self.response is not None:
            self.response.lost(exc)

    def close(self) -> None:
        self.closed = True
        self.parser = None
        if self.transport is not None:
            self.transport.close()

    # -- llhttp's callbacks, for ``response`` (set whenever the parser is fed) ---------------------------
    def on_message_begin(self) -> None:
        response = self.response
        assert response is not None  # fed by it
        if response.complete:
            raise _Refused("bytes after the answer")

    # The head's bytes as llhttp hands them over (``feed`` counts those of a head still unfinished).
    def on_status(self, reason: bytes) -> None:
        response = self.response
        assert response is not None
        response.head_bytes += len(reason) + 16  # checked with the first header, or the head's end

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self.response
        assert response is not None
        response.head_bytes += len(name) + len(value) + 4
        if response.head_bytes > MAX_HEAD:
            raise _Refused(HEAD_TOO_LONG)
        if not response.status:  # after the head: a trailer, dropped
            response.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        response, parser = self.response, self.parser
        assert response is not None and parser is not None  # it calls
        if response.head_bytes > MAX_HEAD:
            raise _Refused(HEAD_TOO_LONG)
        status = parser.get_status_code()
        if not 100 <= status <= 599:
            raise _Refused(f"status {status} is outside 100-599")
        if parser.get_http_version() not in ("1.1", "1.0"):
            raise _Refused(f"HTTP/{parser.get_http_version()} is not HTTP/1.1")
        if status < 200:  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            response.interim += 1
            if response.interim > MAX_INTERIM:
                raise _Refused(f"more than {MAX_INTERIM} interim (1xx) answers")
            response.raw_headers = []
            return
        response.framed(status)

    def on_body(self, piece: bytes) -> None:
        response = self.response
        assert response is not None
        response.on_body(piece)

    def on_message_complete(self) -> None:
        response, parser = self.response, self.parser
        assert response is not None and parser is not None
        if response.status:  # else an interim answer ended
            response.finished(parser.should_keep_alive())


class Response:
    """One answer being received (see the module docstring), fed to its connection's parser."""

    __slots__ = ("_conn", "_error", "_fed", "_finished", "_flow", "_framed", "_headers", "_keep_alive",
                 "_key", "_length", "_paused", "_pool", "_queue", "_queued", "_waiter", "complete",
                 "head_bytes", "interim", "raw_content_type", "raw_headers", "received_any",
                 "status")  # fmt: skip

    def __init__(self, pool: UpstreamPool, conn: Connection, key: tuple[str, int]) -> None:
        self._pool, self._conn, self._key = pool, conn, key
        conn.response = self  # the answer its connection's parser works on, until released
        self.status = 0  # set once the final answer's head is complete
        self.raw_headers: list[tuple[bytes, bytes]] = []  # as received; ``headers`` decodes them
        self._headers: dict[str, str] | None = None
        self.raw_content_type: str | None = None
        self._fed = 0  # bytes fed while the head is not complete
        self.head_bytes = 0  # bytes of status lines, headers and trailers the parser handed over
        self.interim = 0
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._paused = False
        self._length = -1  # Content-Length; -1: not length-framed
        self._framed = False  # by Content-Length, chunked coding or status: else read to close
        self.complete = False
        self._keep_alive = False
        self.received_any = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._finished = False
        self._flow = False  # pause the replica when the consumer lags (streams only; read() takes all)

    @property
    def headers(self) -> dict[str, str]:
        """The final answer's headers, names lower-cased (decoded when first asked for: the proxy needs
        only the content type, which ``raw_content_type`` holds)."""
        if self._headers is None:
            self._headers = {n.decode("latin-1").lower(): v.decode("latin-1") for n, v in self.raw_headers}
        return self._headers

    @property
    def content_type(self) -> str:
        return (self.raw_content_type or "").partition(";")[0].strip().lower()

    # -- fed by the protocol --------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        self.received_any = True
        if self._error is not None:
            return
        conn = self._conn
        parser = conn.parser
        if parser is None or self.complete:  # the answer is complete (or the connection closed)
            self._fail(UpstreamError("the replica sent bytes after its answer"))
            return
        conn.response = self
        try:
            parser.feed_data(data)
        except HttpParserUpgrade:
            self._fail(UpstreamError("the replica switched protocols, which the gateway never asks for"))
            return
        except HttpParserError as err:  # no local keeps it: its traceback holds this frame
            self._fail(UpstreamError(f"the replica's answer is malformed: {_reason(err)}"))
            return
        if not self.status:
            self._fed += len(data)
            if self._fed > MAX_HEAD:
                self._fail(UpstreamError(f"the replica's answer is malformed: {HEAD_TOO_LONG}"))

    def framed(self, status: int) -> None:
        """The final head is complete: how the body ends (llhttp has refused two Content-Lengths, and one
        with chunked coding)."""
        coding = length = None
        for name, value in self.raw_headers:
            lowered = name.lower()
            if lowered == b"content-type":
                self.raw_content_type = value.decode("latin-1")
            elif lowered == b"content-length":
                length = value
            elif lowered == b"transfer-encoding":
                coding = value
        if coding is not None and coding.lower() != b"chunked":
            raise _Refused(f"Transfer-Encoding {coding[:40].decode('latin-1')!r} is not chunked")
        if length is not None and status not in (204, 304):
            self._length = int(length)
        self._framed = coding is not None or length is not None or status in (204, 304)
        self.status = status
        self._wake()

    def on_body(self, piece: bytes) -> None:
        self._queue.append(piece)
        self._queued += len(piece)
        if self._flow and self._queued > HIGH_WATER and not self._paused and self._conn.transport is not None:
            self._paused = True
            self._conn.transport.pause_reading()
        self._wake()

    def finished(self, keep_alive: bool) -> None:
        """The final answer is complete: bytes after it are refused (``on_message_begin``, ``feed``)."""
        self.complete = True
        self._keep_alive = keep_alive
        self._wake()

    def lost(self, exc: Exception | None) -> None:
        if self.complete or self._error is not None:
            return
        if self.status and not self._framed:
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
        pool = self._pool
        waiter = self._waiter = pool.loop.create_future()
        pool.watch(self)  # one timer for all the pool's waits, not a timer per wait (~2 us each)
        try:
            await waiter
        finally:
            pool.unwatch(self)
            self._waiter = None
        if self._error is not None:
            raise self._error

    def timed_out(self) -> None:
        """The pool's watch: this answer's wait lasted ``read_timeout``."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._fail(ReadTimeout(f"the replica sent nothing for {self._pool.read_timeout:g} s"))

    async def readany(self) -> bytes:
        """The next body bytes as they arrive; b"" once the body is complete; the answer's error once the
        bytes before it are taken."""
        self._flow = True
        while not self._queue:
            if self._error is not None:
                raise self._error
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
        if self._length > limit:  # Content-Length says so
            raise self._too_large(limit)
        while not self.complete:
            if self._queued > limit:
                raise self._too_large(limit)
            await self.wait()
        if self._error is not None:
            raise self._error
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
