"""The gateway's client for its hop to the replicas: HTTP/1.1 POST over kept-alive connections.

Why not aiohttp's ClientSession: on the 2-core bench box a bare aiohttp server+ClientSession proxy does
~0.35x nginx's requests/s, the client side being most of the cost. The hop has one shape (POST of a JSON
body to ``http://host:port``, an answer with Content-Length, chunked or read-to-close framing), so this
client does only that, on asyncio protocols: one write per request, the answer parsed by llhttp
(httptools, as uvicorn does; response.py), strictly: a malformed answer closes its connection.

- ``UpstreamPool.post`` returns a ``Response`` once its status and headers arrived; with the replica's
  engine key it sends ``Authorization: Bearer <key>`` (the client's own headers never go upstream). A
  connection that could not be made, or was lost before any byte of the answer, raises ``UpstreamError``
  with ``retryable`` (nothing was answered; a reused keep-alive connection is first retried once fresh).
- ``read()`` gives the whole body; ``readany()`` the next decoded bytes as they arrive (b"" at the end).
  A silence longer than ``read_timeout`` raises ``ReadTimeout`` (all waits share one timer: ``watch``);
  a connection lost mid-answer raises ``UpstreamError``. Reading pauses while more than ``HIGH_WATER``
  bytes wait for the consumer.
- ``release()`` hands a fully read connection back to the pool (closing anything else); ``close()``
  drops the connection, which is how the replica learns the client went away.
Connections are capped at ``limit`` in all; idle ones are reused last-in first-out and closed after
``keepalive_s`` (under vLLM's, uvicorn's 5 s default). TCP keepalive probes (``KEEPALIVE``) end a
connection to a node that vanished without a FIN or RST within ~4 s, so a stream to it fails cleanly.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from functools import lru_cache
from urllib.parse import urlsplit

from hpcserve.serving.gateway.response import Connection, ReadTimeout, Response, UpstreamError
from hpcserve.serving.gateway.routes import ENGINE_KEY_PATTERN

__all__ = ["ReadTimeout", "Response", "UpstreamError", "UpstreamPool", "host_port"]


@lru_cache(maxsize=4096)
def host_port(url: str) -> tuple[str, int, bytes]:
    """(host, port, Host header value) of an ``http://`` base URL."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise UpstreamError(f"replica URL {url!r} is not http://host:port", connect=True)
    port = parts.port or 80
    return parts.hostname, port, parts.netloc.encode()


@lru_cache(maxsize=4096)
def auth_line(key: str | None) -> bytes:
    """The request's ``Authorization`` header line for an engine key (nothing without one); a key that is
    not one header token is refused, never written into the request."""
    if key is None:
        return b""
    if not re.fullmatch(ENGINE_KEY_PATTERN, key):
        raise UpstreamError("the replica's engine key is not a bearer token", connect=True)
    return b"\r\nAuthorization: Bearer " + key.encode()


class UpstreamPool:
    """Kept-alive connections per replica, ``limit`` in all (see the module docstring)."""

    def __init__(
        self, limit: int, connect_timeout: float, read_timeout: float, keepalive_s: float = 4.0
    ) -> None:
        self.connect_timeout, self.read_timeout, self.keepalive_s = connect_timeout, read_timeout, keepalive_s
        self.limit = limit
        self._active = 0  # connections handed out
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._idle: dict[tuple[str, int], list[Connection]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waits: dict[Response, float] = {}  # answers waited for -> deadline, oldest first
        self._watch: asyncio.TimerHandle | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the pool runs on (asked once: asking costs a getpid() call each time)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def watch(self, response: Response) -> None:
        """``response`` waits for bytes: ``timed_out()`` is called on it after ``read_timeout`` unless
        ``unwatch`` comes first. All waits share one timer, at the oldest wait's deadline (every wait
        lasts the same ``read_timeout``, so the oldest ends first)."""
        deadline = self.loop.time() + self.read_timeout
        self._waits[response] = deadline
        if self._watch is None:
            self._watch = self.loop.call_at(deadline, self._check_waits)

    def unwatch(self, response: Response) -> None:
        self._waits.pop(response, None)

    def _check_waits(self) -> None:
        """Time out the waits past their deadline; the timer again for the oldest left."""
        self._watch = None
        now, waits = self.loop.time(), self._waits
        while waits:
            response, deadline = next(iter(waits.items()))
            if deadline > now:
                self._watch = self.loop.call_at(deadline, self._check_waits)
                return
            del waits[response]
            response.timed_out()

    async def post(self, url: str, path: str, body: bytes, key: str | None = None) -> Response:
        """Send a JSON POST (with the engine ``key`` as its bearer token) and wait for the answer's head
        (see the module docstring for errors)."""
        host, port, netloc = host_port(url)
        request = b"".join((
            b"POST ", path.encode(), b" HTTP/1.1\r\nHost: ", netloc, b"\r\nContent-Type: application/json",
            auth_line(key), b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\n\r\n", body,
        ))  # fmt: skip
        if self._active >= self.limit or self._slot_waiters:
            await self._wait_for_slot()
        self._active += 1
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
            self._free_slot()
            raise

    async def _wait_for_slot(self) -> None:
        waiter = self.loop.create_future()
        self._slot_waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # handed a slot it will not use: pass it on
            elif waiter in self._slot_waiters:
                self._slot_waiters.remove(waiter)
            raise

    def _free_slot(self) -> None:
        self._active -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _exchange(self, key: tuple[str, int], conn: Connection, request: bytes) -> Response:
        response = conn.response = Response(self, conn, key)
        assert conn.transport is not None
        conn.transport.write(request)
        try:
            while not response.status:
                await response.wait()
        except BaseException:
            conn.close()
            conn.response = None
            raise
        return response

    async def _connect(self, host: str, port: int) -> Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await self.loop.create_connection(Connection, host, port)
        except (OSError, TimeoutError) as err:
            raise UpstreamError(
                f"cannot connect to {host}:{port}: {err or 'timed out'}", retryable=True, connect=True
            ) from None
        return conn

    def _take_idle(self, key: tuple[str, int]) -> Connection | None:
        idle = self._idle.get(key)
        deadline = self.loop.time() - self.keepalive_s
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.idle_since > deadline:
                return conn
            conn.close()
        return None

    def give_back(self, key: tuple[str, int], conn: Connection, reusable: bool) -> None:
        self._free_slot()
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
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
