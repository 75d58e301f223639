"""The gateway's replica-answer parser (response.py on httptools), as property tests: the real
``Connection``/``Response`` objects are fed a raw answer cut at every byte boundary (and at random
multi-cuts), then read with ``read()`` or ``readany()`` as the proxy reads them.

A valid answer (Content-Length, chunked with random chunk sizes, extensions and trailers, or read-to-close;
after up to ``MAX_INTERIM`` interim answers) decodes to the same status, headers and body however it is
cut, and its connection is reused exactly when it may be. Each malformed answer fails with an
``UpstreamError`` at every cut, before any read timeout, and its connection is never reused. Then what the
parser must keep: no reference cycle per answer, flow control, the read timeout and the body cap.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcserve.serving.gateway.client import UpstreamPool
from hpcserve.serving.gateway.response import (
    HIGH_WATER,
    MAX_HEAD,
    MAX_INTERIM,
    BodyTooLarge,
    Connection,
    ReadTimeout,
    Response,
    UpstreamError,
)

LIMIT = 1 << 20
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOKEN = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
VALUE = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789 ;=/,.", max_size=30).map(str.strip)
INTERIM = (
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n",
)


@dataclass(frozen=True)
class Outcome:
    """What the gateway saw: the head, the body (None on an error), the error's kind, and whether the
    connection went back to the pool."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes | None
    error: type[UpstreamError] | None
    reused: bool


@dataclass(frozen=True)
class Answer:
    """A valid raw answer and what it must decode to."""

    wire: bytes
    status: int
    headers: dict[str, str]
    body: bytes
    eof: bool  # read-to-close: the replica closes after it
    reusable: bool
    head: int  # bytes up to the body


async def _drain(response: Response, stream: bool) -> bytes:
    try:
        if not stream:
            return await response.read(LIMIT)
        pieces = []
        while piece := await response.readany():
            pieces.append(piece)
        return b"".join(pieces)
    finally:
        response.release()


def receive(pieces: list[bytes], *, eof: bool, stream: bool = False) -> Outcome:
    """Feed ``pieces`` to a fresh connection's protocol as the event loop would, then read the answer."""
    pool = UpstreamPool(4, connect_timeout=1.0, read_timeout=0.2)
    conn = Connection()
    response = conn.response = Response(pool, conn, ("h", 1))
    for piece in pieces:
        if piece:  # asyncio never delivers b""
            conn.data_received(piece)
    if eof:
        conn.connection_lost(None)
    body: bytes | None = None
    error: type[UpstreamError] | None = None
    try:
        body = asyncio.run(_drain(response, stream))
    except UpstreamError as err:
        error = type(err)
    headers = tuple(sorted(response.headers.items()))
    return Outcome(response.status, headers, body, error, not conn.closed)


def every_cut(wire: bytes, step: int = 1) -> Iterator[list[bytes]]:
    """The wire in two pieces, cut at every ``step``-th byte boundary (and both ends)."""
    for cut in [*range(0, len(wire), step), len(wire)]:
        yield [wire[:cut], wire[cut:]]


def cut_at(wire: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(c % (len(wire) + 1) for c in cuts), len(wire)]
    return [wire[a:b] for a, b in itertools.pairwise(bounds)]


def _chunked(body: bytes, sizes: list[int], exts: list[str], upper: bool) -> bytes:
    out, at, i = [], 0, 0
    while at < len(body):
        size = min(sizes[i % len(sizes)], len(body) - at)
        hexsize = f"{size:X}" if upper else f"{size:x}"
        ext = f";{exts[i % len(exts)]}" if exts and i % 2 else ""
        out.append(f"{hexsize}{ext}\r\n".encode() + body[at : at + size] + b"\r\n")
        at, i = at + size, i + 1
    return b"".join(out)


@st.composite
def answers(draw: st.DrawFn) -> Answer:
    """A valid answer: any status, extra headers, one of the three framings, optional interim answers."""
    status = draw(st.sampled_from([200, 200, 201, 204, 304, 400, 404, 429, 500, 503]))
    body = b"" if status in (204, 304) else draw(st.binary(max_size=300))
    framing = "none" if status in (204, 304) else draw(st.sampled_from(["length", "chunked", "close"]))
    close = framing != "close" and draw(st.booleans())
    extra = draw(st.dictionaries(TOKEN.map(lambda t: "x-" + t), VALUE, max_size=4))
    headers = {"content-type": draw(st.sampled_from(["application/json", "text/event-stream"])), **extra}
    if close:
        headers["connection"] = "close"
    tail = b""
    if framing == "length":
        headers["content-length"] = str(len(body))
        payload = body
    elif framing == "chunked":
        headers["transfer-encoding"] = "chunked"
        sizes = draw(st.lists(st.integers(1, 80), min_size=1, max_size=6))
        exts = draw(st.lists(st.sampled_from(["a=1", "name", 'q="x y"', "b=c;d"]), max_size=2))
        payload = _chunked(body, sizes, exts, draw(st.booleans())) + b"0\r\n"
        trailers = draw(st.dictionaries(TOKEN.map(lambda t: "t-" + t), VALUE, max_size=2))
        tail = b"".join(f"{k}: {v}\r\n".encode() for k, v in trailers.items()) + b"\r\n"
    else:
        payload = body
    names = {name: draw(st.sampled_from([name, name.title(), name.upper()])) for name in headers}
    lines = "".join(f"{names[k]}: {v}\r\n" for k, v in headers.items())
    head = f"HTTP/1.1 {status} Reason Phrase\r\n{lines}"
    interim = b"".join(draw(st.lists(st.sampled_from(INTERIM), max_size=MAX_INTERIM)))
    before = interim + head.encode() + b"\r\n"
    reusable = framing != "close" and not close
    return Answer(before + payload + tail, status, headers, body, framing == "close", reusable, len(before))


def _expected(answer: Answer) -> Outcome:
    headers = tuple(sorted(answer.headers.items()))
    return Outcome(answer.status, headers, answer.body, None, answer.reusable)


@SETTINGS
@given(answers())
def test_a_valid_answer_decodes_the_same_at_every_cut(answer: Answer) -> None:
    expected = _expected(answer)
    assert receive([answer.wire], eof=answer.eof) == expected
    for pieces in every_cut(answer.wire):
        assert receive(pieces, eof=answer.eof) == expected, pieces


@SETTINGS
@given(answers(), st.lists(st.integers(0, 10_000), max_size=12), st.booleans())
def test_a_valid_answer_decodes_the_same_at_random_multi_cuts(
    answer: Answer, cuts: list[int], stream: bool
) -> None:
    got = receive(cut_at(answer.wire, cuts), eof=answer.eof, stream=stream)
    assert got == _expected(answer)


@SETTINGS
@given(answers())
def test_a_cut_off_framed_answer_fails_and_is_never_reused(answer: Answer) -> None:
    if answer.eof or answer.status in (204, 304):
        return
    for cut in range(answer.head, len(answer.wire)):
        got = receive([answer.wire[:cut]], eof=True)
        assert (got.error, got.reused) == (UpstreamError, False), cut


# -- malformed answers -------------------------------------------------------------------------------
OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
CHUNKED = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
BAD_SIZES = [b"0x5", b"+5", b"-1", b" 5", b"5 ", b"5 ;a=1", b"5\t", b"f" * 17, b"1" + b"0" * 16, b"", b"g"]
BAD_STATUS_LINES = [
    b"HTTP/1.1 1000 OK", b"HTTP/1.1 20 OK", b"HTTP/1.1 200OK", b"HTTP/1.1 OK", b"HTTP/1.x 200 OK",
    b"HTTP/2.0 200 OK", b"HTTP/3 200 OK", b"ICY 200 OK", b"HTTP/1.1  200 OK", b"http/1.1 200 OK", b"\x00",
]  # fmt: skip


@st.composite
def malformed(draw: st.DrawFn) -> bytes:
    """One answer of each malformed kind the gateway must refuse."""
    kind = draw(st.sampled_from(["size", "status", "range", "lengths", "length+chunked", "coding", "after",
                                 "interim", "upgrade", "fold"]))  # fmt: skip
    body = draw(st.binary(min_size=1, max_size=40))
    n = len(body)
    if kind == "size":
        return CHUNKED + draw(st.sampled_from(BAD_SIZES)) + b"\r\n" + body + b"\r\n0\r\n\r\n"
    if kind == "status":
        return draw(st.sampled_from(BAD_STATUS_LINES)) + b"\r\nContent-Length: 0\r\n\r\n"
    if kind == "range":
        status = draw(st.integers(0, 99) | st.integers(600, 999))
        return f"HTTP/1.1 {status:03d} X\r\nContent-Length: {n}\r\n\r\n".encode() + body
    if kind == "lengths":
        other = draw(st.integers(0, 100))
        return OK_HEAD + f"Content-Length: {n}\r\nContent-Length: {other}\r\n\r\n".encode() + body
    if kind == "length+chunked":
        framing = [f"Content-Length: {n}\r\n".encode(), b"Transfer-Encoding: chunked\r\n"]
        order = framing if draw(st.booleans()) else framing[::-1]
        return OK_HEAD + b"".join(order) + b"\r\n" + f"{n:x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    if kind == "coding":
        coding = draw(st.sampled_from([b"gzip", b"chunked, gzip", b"identity", b"gzip, chunked"]))
        return OK_HEAD + b"Transfer-Encoding: " + coding + b"\r\n\r\n" + f"{n:x}\r\n".encode() + body
    if kind == "after":
        extra = draw(st.binary(min_size=1, max_size=30).filter(lambda b: b.strip(b"\r\n") != b""))
        extra = draw(st.sampled_from([extra, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]))
        return OK_HEAD + f"Content-Length: {n}\r\n\r\n".encode() + body + extra
    if kind == "interim":
        flood = draw(st.integers(MAX_INTERIM + 1, MAX_INTERIM + 20))
        return INTERIM[0] * flood + OK_HEAD + f"Content-Length: {n}\r\n\r\n".encode() + body
    if kind == "upgrade":
        return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n" + body
    return OK_HEAD + b"X-Folded: a\r\n b\r\n" + f"Content-Length: {n}\r\n\r\n".encode() + body


def assert_refused(pieces: list[bytes], stream: bool = False) -> None:
    got = receive(pieces, eof=False, stream=stream)
    assert got.error is not None and got.error is not ReadTimeout, (got, pieces)
    assert (got.body, got.reused) == (None, False), got
    # the replica closing the connection afterwards changes nothing
    got = receive(pieces, eof=True, stream=stream)
    assert got.error is UpstreamError and not got.reused, (got, pieces)


@SETTINGS
@given(malformed())
def test_a_malformed_answer_fails_at_every_cut(wire: bytes) -> None:
    for pieces in every_cut(wire):
        assert_refused(pieces)


@SETTINGS
@given(malformed(), st.lists(st.integers(0, 10_000), max_size=12))
def test_a_malformed_answer_fails_at_random_multi_cuts_streamed(wire: bytes, cuts: list[int]) -> None:
    assert_refused(cut_at(wire, cuts), stream=True)


@pytest.mark.parametrize("where", ["status", "header", "trailer"])
def test_an_over_long_head_fails_however_it_arrives(where: str) -> None:
    big = b"x" * (MAX_HEAD + 10)
    wire = {
        "status": b"HTTP/1.1 200 " + big + b"\r\nContent-Length: 0\r\n\r\n",
        "header": OK_HEAD + b"X-Big: " + big + b"\r\nContent-Length: 0\r\n\r\n",
        "trailer": CHUNKED + b"1\r\na\r\n0\r\nX-Big: " + big + b"\r\n\r\n",
    }[where]
    for pieces in every_cut(wire, step=997):
        assert_refused(pieces)
    assert_refused([wire[i : i + 1500] for i in range(0, len(wire), 1500)], stream=True)
    endless = [OK_HEAD, *([b"X-More: " + b"y" * 1000 + b"\r\n"] * 70)]  # the head never ends
    assert_refused(endless)


def test_a_head_just_under_the_limit_is_taken_however_it_arrives() -> None:
    wire = OK_HEAD + b"X-Big: " + b"x" * (MAX_HEAD - 200) + b"\r\nContent-Length: 2\r\n\r\nhi"
    for pieces in [*every_cut(wire, step=997), [wire[i : i + 1000] for i in range(0, len(wire), 1000)]]:
        got = receive(pieces, eof=False)
        assert (got.status, got.body, got.error, got.reused) == (200, b"hi", None, True)


def test_a_flood_of_interim_answers_fails_without_recursion() -> None:
    flood = INTERIM[0] * 200_000 + OK_HEAD + b"Content-Length: 0\r\n\r\n"
    assert_refused([flood])
    assert_refused([INTERIM[0]] * 1000)


def test_a_valid_answer_with_the_most_interim_answers_still_works() -> None:
    wire = INTERIM[1] * MAX_INTERIM + OK_HEAD + b"Content-Length: 2\r\n\r\nhi"
    for pieces in every_cut(wire):
        got = receive(pieces, eof=False)
        assert (got.status, got.body, got.error, got.reused) == (200, b"hi", None, True)


@pytest.mark.parametrize(
    "wire",
    [
        OK_HEAD + b"Content-Length: 2\r\n\r\nhi",
        INTERIM[1] + CHUNKED + b"2\r\nhi\r\n0\r\nX-T: 1\r\n\r\n",
        b"HTTP/1.1 1000 OK\r\n\r\n",  # refused by llhttp
        b"HTTP/1.1 600 OK\r\n\r\n",  # refused by a callback
        OK_HEAD + b"Content-Length: 2\r\n\r\nhixyz",  # bytes after the answer
    ],
)
def test_an_answer_leaves_no_reference_cycle(wire: bytes) -> None:
    """The parser's callbacks hold the response: a cycle per answer would keep the garbage collector busy
    on the gateway's hot path."""

    async def garbage() -> int:
        pool = UpstreamPool(4, connect_timeout=1.0, read_timeout=1.0)
        gc.collect()
        gc.disable()
        try:
            for _ in range(100):
                conn = Connection()
                response = conn.response = Response(pool, conn, ("h", 1))
                conn.data_received(wire)
                response.body()
                response.release()
            return gc.collect()
        finally:
            gc.enable()

    assert asyncio.run(garbage()) == 0


# -- what the parser keeps from before: flow control, read timeout, the body cap ---------------------------
class FakeTransport:
    """Records what the response asks of its transport."""

    def __init__(self) -> None:
        self.paused = self.closed = False
        self.pauses = 0

    def get_extra_info(self, name: str) -> None:
        return None

    def pause_reading(self) -> None:
        self.paused, self.pauses = True, self.pauses + 1

    def resume_reading(self) -> None:
        self.paused = False

    def close(self) -> None:
        self.closed = True


def _connected(read_timeout: float = 1.0) -> tuple[UpstreamPool, Connection, FakeTransport]:
    conn, transport = Connection(), FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return UpstreamPool(4, connect_timeout=1.0, read_timeout=read_timeout), conn, transport


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_a_lagging_stream_pauses_the_replica_and_resumes_it() -> None:
    async def scenario() -> None:
        pool, conn, transport = _connected()
        response = conn.response = Response(pool, conn, ("h", 1))
        conn.data_received(CHUNKED + _chunk(b"a"))
        assert await response.readany() == b"a"  # a stream: flow control on
        piece = b"x" * 16384
        for _ in range(HIGH_WATER // len(piece) + 2):
            conn.data_received(_chunk(piece))
        assert transport.paused and transport.pauses == 1
        while transport.paused:
            assert await response.readany() == piece
        conn.data_received(b"0\r\n\r\n")
        while await response.readany():
            pass
        response.release()
        assert not transport.closed and not conn.closed  # kept alive for the next request

    asyncio.run(scenario())


def test_a_silent_replica_is_a_read_timeout_and_its_connection_closes() -> None:
    async def scenario() -> None:
        pool, conn, transport = _connected(read_timeout=0.05)
        response = conn.response = Response(pool, conn, ("h", 1))
        conn.data_received(OK_HEAD + b"Content-Length: 10\r\n\r\nhalf")
        with pytest.raises(ReadTimeout, match=r"sent nothing for 0\.05 s"):
            await response.read(LIMIT)
        assert transport.closed

    asyncio.run(scenario())


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_an_answer_over_the_cap_is_body_too_large(framing: str) -> None:
    async def scenario() -> None:
        pool, conn, transport = _connected()
        response = conn.response = Response(pool, conn, ("h", 1))
        if framing == "length":
            conn.data_received(OK_HEAD + b"Content-Length: 101\r\n\r\n")  # known before the body
        else:
            conn.data_received(CHUNKED + _chunk(b"y" * 101))
        with pytest.raises(BodyTooLarge, match="larger than 100 bytes"):
            await response.read(100)
        assert transport.closed

    asyncio.run(scenario())
