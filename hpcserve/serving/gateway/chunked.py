"""Decoding HTTP/1.1 ``Transfer-Encoding: chunked`` bodies incrementally (RFC 9112 section 7.1), purely.

``ChunkedDecoder.feed(data)`` returns the body bytes that ``data`` completes, in order, as soon as they
arrive (a chunk split across reads comes out in pieces), and ``done`` turns true after the last chunk and
its trailer section. Malformed framing raises ``ChunkedError``.
"""

from __future__ import annotations

from enum import Enum

MAX_LINE = 8192


class ChunkedError(ValueError):
    """The upstream sent chunked framing that does not parse."""


class _State(Enum):
    SIZE = 1  # a chunk-size line
    DATA = 2  # chunk data
    DATA_END = 3  # the CRLF after chunk data
    TRAILER = 4  # trailer lines, up to an empty one
    DONE = 5


class ChunkedDecoder:
    __slots__ = ("_buf", "_left", "_state")

    def __init__(self) -> None:
        self._buf = b""
        self._left = 0
        self._state = _State.SIZE

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    def feed(self, data: bytes) -> list[bytes]:
        """The body bytes that ``data`` delivers (see the module docstring)."""
        buf = self._buf + data if self._buf else data
        out: list[bytes] = []
        pos = 0
        while pos < len(buf) and self._state is not _State.DONE:
            moved = self._step(buf, pos, out)
            if moved == pos:
                break
            pos = moved
        self._buf = buf[pos:]
        if len(self._buf) > MAX_LINE:
            raise ChunkedError("chunk framing line too long")
        return out

    def _step(self, buf: bytes, pos: int, out: list[bytes]) -> int:
        """Consume what the current state can from ``buf[pos:]``; returns the new position."""
        state = self._state
        if state is _State.DATA:
            take = min(self._left, len(buf) - pos)
            out.append(buf[pos : pos + take])
            self._left -= take
            if not self._left:
                self._state = _State.DATA_END
            return pos + take
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return pos
        line = buf[pos:end]
        if state is _State.SIZE:
            self._size_line(line)
        elif state is _State.DATA_END:
            if line:
                raise ChunkedError("chunk data longer than its size")
            self._state = _State.SIZE
        elif not line:  # TRAILER: the empty line ends the message
            self._state = _State.DONE
        return end + 2

    def _size_line(self, line: bytes) -> None:
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise ChunkedError(f"bad chunk size line {line[:40]!r}") from None
        if size < 0:
            raise ChunkedError(f"bad chunk size line {line[:40]!r}")
        self._left = size
        self._state = _State.DATA if size else _State.TRAILER
