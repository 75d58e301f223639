"""Counters the gateway keeps, and what it hands to its callbacks.

Every table here is keyed by configured keys and known deployments only (unknown models count under
``_unknown``, requests without a valid key under ``_none``, status codes outside ``CODES`` under their
class such as ``5xx``), so nothing grows with the number of requests.

- ``report(samples)`` gets one ``GatewaySample`` per known deployment every ~1 s: requests waiting for a
  replica (the scale-from-zero signal), requests in flight, and requests/s since the last sample.
- ``usage_sink(rows)`` gets ``UsageRow``s every ~10 s: per key and deployment, what was used since the
  last rows (requests answered by a replica, prompt and completion tokens).
Both are called from a worker thread, one call at a time; an exception is logged and the data dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

UNKNOWN = "_unknown"
NO_KEY = "_none"
CODES = frozenset({200, 400, 401, 404, 408, 413, 422, 429, 499, 500, 502, 503, 504})


def code_label(status: int) -> str:
    """A bounded label for a status code: itself when listed in CODES, else its class (``4xx``)."""
    return str(status) if status in CODES else f"{status // 100}xx"


@dataclass(frozen=True, slots=True)
class GatewaySample:
    at: datetime
    deployment: str
    buffered: int
    inflight: int
    requests_per_s: float


@dataclass(frozen=True, slots=True)
class UsageRow:
    at: datetime
    key_id: str
    owner: str
    deployment: str
    requests: int
    prompt_tokens: int
    completion_tokens: int


Report = Callable[[Sequence[GatewaySample]], None]
UsageSink = Callable[[Sequence[UsageRow]], None]


def no_report(samples: Sequence[GatewaySample]) -> None:
    """The default report callback: drop the samples."""


def no_usage_sink(rows: Sequence[UsageRow]) -> None:
    """The default usage sink: drop the rows."""


class _Usage:
    __slots__ = ("completion", "owner", "prompt", "requests", "sent")

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.requests = self.prompt = self.completion = 0
        self.sent = (0, 0, 0)  # the totals already handed to the sink


class Stats:
    """Request, usage, in-flight and rate counters (see the module docstring)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}  # (model, key, code) -> total
        self.usage: dict[tuple[str, str], _Usage] = {}  # (key, deployment)
        self.inflight: dict[str, int] = {}
        self._started: dict[str, int] = {}  # since the last tick
        self._tokens: dict[str, int] = {}  # completion tokens since the last tick
        self.requests_per_s: dict[str, float] = {}
        self.tokens_per_s: dict[str, float] = {}
        self._tick_at: float | None = None

    def count(self, model: str, key_id: str, status: int) -> None:
        label = (model, key_id, code_label(status))
        self.requests[label] = self.requests.get(label, 0) + 1

    def begin(self, deployment: str) -> None:
        self.inflight[deployment] = self.inflight.get(deployment, 0) + 1
        self._started[deployment] = self._started.get(deployment, 0) + 1

    def end(self, deployment: str) -> None:
        left = self.inflight.get(deployment, 1) - 1
        if left > 0:
            self.inflight[deployment] = left
        else:
            self.inflight.pop(deployment, None)

    def use(self, key_id: str, owner: str, deployment: str, prompt: int, completion: int) -> None:
        """Account one request a replica answered."""
        entry = self.usage.get((key_id, deployment))
        if entry is None:
            entry = self.usage[(key_id, deployment)] = _Usage(owner)
        entry.requests += 1
        entry.prompt += prompt
        entry.completion += completion
        self._tokens[deployment] = self._tokens.get(deployment, 0) + completion

    def tick(
        self, now: float, at: datetime, deployments: Collection[str], buffered: Callable[[str], int]
    ) -> list[GatewaySample]:
        """Rates since the last tick, and one sample per known deployment."""
        elapsed = now - self._tick_at if self._tick_at is not None else 0.0
        self._tick_at = now
        self.requests_per_s = _rates(self._started, elapsed)
        self.tokens_per_s = _rates(self._tokens, elapsed)
        self._started, self._tokens = {}, {}
        return [
            GatewaySample(at, d, buffered(d), self.inflight.get(d, 0), self.requests_per_s.get(d, 0.0))
            for d in sorted(deployments)
        ]

    def flush(self, at: datetime) -> list[UsageRow]:
        """Usage since the last flush, one row per key and deployment that used anything."""
        rows = []
        for (key_id, deployment), u in self.usage.items():
            total = (u.requests, u.prompt, u.completion)
            if total != u.sent:
                delta = [now - before for now, before in zip(total, u.sent, strict=True)]
                rows.append(UsageRow(at, key_id, u.owner, deployment, *delta))
                u.sent = total
        return rows

    def prune(self, deployments: Collection[str], key_ids: Collection[str]) -> None:
        """Forget deployments and keys that are gone (usage not yet flushed stays until it is)."""
        self.requests = {
            label: n
            for label, n in self.requests.items()
            if label[0] in deployments or label[0] == UNKNOWN
            if label[1] in key_ids or label[1] == NO_KEY
        }
        self.usage = {
            label: u
            for label, u in self.usage.items()
            if (label[1] in deployments and label[0] in key_ids)
            or (u.requests, u.prompt, u.completion) != u.sent
        }


def _rates(counts: Mapping[str, int], elapsed: float) -> dict[str, float]:
    return {d: n / elapsed for d, n in counts.items()} if elapsed > 0 else {}


def usage_totals(stats: Stats) -> Iterator[tuple[str, str, int, int]]:
    """(key, deployment, prompt tokens, completion tokens) for every usage entry."""
    for (key_id, deployment), u in stats.usage.items():
        yield key_id, deployment, u.prompt, u.completion
