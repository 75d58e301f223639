"""The soak's load: the Azure LLM code trace (2023) replayed through two gateways, time-compressed and with
its token counts scaled down, as a mix of streamed and non-streamed chat completions; and what came of each
request, kept in bounded counters and histograms (a 30-minute soak holds no list of samples).

A client behind a load balancer: a request goes to gateway ``i % 2``; when that gateway refuses the
connection, it goes to the other one (a retry, counted, not an error). TTFT is the time to the first content
event of a stream, or to the whole answer of a non-streamed request. See soak.py for how to run the soak.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

STREAM_EVERY = 3  # two requests in three are streamed
CUTS_KEPT = 200  # cut streams listed one by one; more are counted only
ERRORS_KEPT = 100  # the first errors, with their time and answer
TIMEOUT_S = 120.0
CLEAN_CUT = "clean cut"  # a stream that ended in the gateway's error event: judged in the report


@dataclass(frozen=True)
class Shape:
    """How the trace becomes load: ``compress`` x faster, prompts x ``prompt_scale``, outputs x
    ``output_scale`` (at least 1, at most ``max_output``)."""

    compress: float = 2.0
    prompt_scale: float = 0.05
    output_scale: float = 1.0
    max_output: int = 400


@dataclass(frozen=True)
class Arrival:
    at_s: float
    prompt_tokens: int
    output_tokens: int


LONG = Arrival(0.0, 8, 400)


def arrivals(path: Path, shape: Shape, until_s: float) -> Iterator[Arrival]:
    """The trace's rows as sends, ``shape``-scaled, replayed again from its start (shifted by its span) until
    ``until_s`` seconds; read lazily, one row at a time."""
    offset = 0.0
    while True:
        last = 0.0
        with path.open() as rows:
            for row in csv.DictReader(rows):
                last = float(row["arrival_time_s"])
                at = offset + last / shape.compress
                if at >= until_s:
                    return
                out = min(shape.max_output, max(1, round(int(row["output_tokens"]) * shape.output_scale)))
                yield Arrival(at, max(1, round(int(row["prompt_tokens"]) * shape.prompt_scale)), out)
        if last <= 0:
            return
        offset += last / shape.compress + 1.0


@dataclass
class Histogram:
    """Log-bucketed latencies (2% wide buckets): percentiles within 2%, in memory bounded by the range."""

    buckets: Counter[int] = field(default_factory=Counter)
    count: int = 0
    WIDTH = math.log(1.02)

    def add(self, seconds: float) -> None:
        self.buckets[int(math.log(max(seconds, 1e-5)) / self.WIDTH)] += 1
        self.count += 1

    def quantile(self, q: float) -> float | None:
        if not self.count:
            return None
        rank, seen = q * self.count, 0
        for bucket in sorted(self.buckets):
            seen += self.buckets[bucket]
            if seen >= rank:
                return math.exp((bucket + 0.5) * self.WIDTH)
        return None


@dataclass
class Stats:
    """Every request's outcome, in counters; ``first_fault_s`` splits TTFT into before and during faults."""

    first_fault_s: float
    sent: int = 0  # the trace's requests and the long streams (``dropped`` not included)
    ok: int = 0
    streamed: int = 0
    retries: int = 0
    dropped: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    ttft_before: Histogram = field(default_factory=Histogram)
    ttft_during: Histogram = field(default_factory=Histogram)
    cuts: list[dict[str, Any]] = field(default_factory=list)
    cuts_total: int = 0
    cuts_clean: int = 0
    inflight: int = 0
    peak_inflight: int = 0
    first_errors: list[dict[str, Any]] = field(default_factory=list)

    def error(self, at_s: float, gateway: int, why: str, detail: str) -> None:
        self.errors[why] += 1
        if len(self.first_errors) < ERRORS_KEPT:
            self.first_errors.append({"at_s": round(at_s, 1), "gateway": gateway, "cause": why,
                                      "detail": detail[:300]})  # fmt: skip

    def ttft(self, started_s: float, seconds: float) -> None:
        (self.ttft_before if started_s < self.first_fault_s else self.ttft_during).add(seconds)

    def cut(self, at_s: float, gateway: int, clean: bool, why: str) -> None:
        self.cuts_total += 1
        self.cuts_clean += clean
        if len(self.cuts) < CUTS_KEPT:
            self.cuts.append({"at_s": round(at_s, 1), "gateway": gateway, "clean": clean, "error": why[:300]})


class Client:
    """Sends each arrival at its time through the gateways; ``max_inflight`` bounds what it holds."""

    def __init__(
        self, urls: list[str], key: str, model: str, stats: Stats, t0: float, max_inflight: int
    ) -> None:
        self.urls, self.model, self.stats, self.t0, self.max_inflight = urls, model, stats, t0, max_inflight
        limits = httpx.Limits(max_connections=max_inflight, max_keepalive_connections=64)
        self.http = httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                      timeout=httpx.Timeout(TIMEOUT_S, connect=5.0))  # fmt: skip
        self.tasks: set[asyncio.Task[None]] = set()

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def replay(self, sends: Iterator[Arrival], end_s: float, long_streams: int = 0) -> None:
        """Every arrival at its time until ``end_s``, beside ``long_streams`` clients streaming without pause;
        then wait for what is still in flight (at most ``TIMEOUT_S``)."""
        for k in range(long_streams):
            task = asyncio.create_task(self.steady(k, end_s))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        for n, arrival in enumerate(sends):
            delay = arrival.at_s - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.stats.inflight >= self.max_inflight:
                self.stats.dropped += 1  # the client's own bound: not sent, never an error of the system
                continue
            task = asyncio.create_task(self.one(n, arrival, n % STREAM_EVERY != 2))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        await asyncio.sleep(max(0.0, end_s - self.now()))  # the trace may fall quiet before the end
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=TIMEOUT_S + 10)
        await self.http.aclose()

    def body(self, arrival: Arrival, stream: bool) -> dict[str, Any]:
        return {"model": self.model, "stream": stream, "max_tokens": arrival.output_tokens,
                "messages": [{"role": "user", "content": "tok " * arrival.prompt_tokens}]}  # fmt: skip

    async def steady(self, k: int, end_s: float) -> None:
        """One long stream after another until ``end_s`` (``LONG`` tokens, through gateway ``k % 2`` first):
        streams in flight whenever a fault strikes, whatever the trace is doing then."""
        n = k
        while self.now() < end_s:
            errors = sum(self.stats.errors.values())
            await self.one(n, LONG, True)
            n += 2
            if sum(self.stats.errors.values()) > errors:
                await asyncio.sleep(1.0)  # as a client does after an error: no tight loop of failures

    async def one(self, n: int, arrival: Arrival, stream: bool) -> None:
        stats, outcome = self.stats, None
        stats.sent += 1
        stats.inflight += 1
        stats.peak_inflight = max(stats.peak_inflight, stats.inflight)
        stats.streamed += stream
        started = self.now()
        gateway = n % 2
        try:
            for attempt in range(2):
                try:
                    outcome = await self.send(gateway, self.body(arrival, stream), stream, started)
                    break
                except httpx.ConnectError:
                    if attempt:
                        raise
                    stats.retries += 1  # refused: the other gateway, as behind a load balancer
                    gateway = 1 - gateway
            if outcome is None:
                stats.ok += 1
            elif isinstance(outcome, tuple):
                stats.error(started, gateway, *outcome)
        except Exception as exc:  # every failure is a cause in the report, never a crash of the soak
            stats.error(started, gateway, type(exc).__name__, repr(exc))
        finally:
            stats.inflight -= 1

    async def send(
        self, gateway: int, body: dict[str, Any], stream: bool, started: float
    ) -> tuple[str, str] | str | None:
        """One request; None when it succeeded, ``CLEAN_CUT``, else its error's cause and detail."""
        url = self.urls[gateway] + "/v1/chat/completions"
        if not stream:
            answer = await self.http.post(url, json=body)
            if answer.status_code != 200:
                return cause(answer.status_code, answer.content)
            self.stats.ttft(started, self.now() - started)
            return None if b'"choices"' in answer.content else ("200 without choices", answer.text)
        async with self.http.stream("POST", url, json=body) as answer:
            if answer.status_code != 200:
                return cause(answer.status_code, await answer.aread())
            return await self.events(answer, gateway, started)

    async def events(
        self, answer: httpx.Response, gateway: int, started: float
    ) -> tuple[str, str] | str | None:
        first = True
        try:
            async for line in answer.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    return None
                if data.startswith('{"error"'):
                    self.stats.cut(self.now(), gateway, True, data)
                    return CLEAN_CUT
                if first and '"content"' in data:
                    first = False
                    self.stats.ttft(started, self.now() - started)
        except httpx.HTTPError as exc:
            self.stats.cut(self.now(), gateway, False, repr(exc))
            return f"stream broken without an error event ({type(exc).__name__})", repr(exc)
        self.stats.cut(self.now(), gateway, False, "the stream ended without [DONE] or an error event")
        return "stream ended without [DONE] or an error event", ""


def cause(status: int, body: bytes) -> tuple[str, str]:
    """``HTTP <status> <code>`` from an OpenAI-style error body (its code, else its type), and the body."""
    text = body.decode(errors="replace")
    try:
        error = json.loads(body)["error"]
        return f"HTTP {status} {error.get('code') or error.get('type')} ({error.get('type')})", text
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}", text
