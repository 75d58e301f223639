"""Counters the gateway keeps, and what it hands to its callbacks.

Every table here is keyed by configured keys and known deployments only (unknown models count under
``_unknown``, requests without a valid key under ``_none``, status codes outside ``CODES`` under their
class such as ``5xx``), so nothing grows with the number of requests.

- ``report(samples)`` gets one ``GatewaySample`` per known deployment every ~1 s: requests waiting for a
  replica (the scale-from-zero signal), requests in flight, requests/s since the last sample, and
  requests waiting for a slot of a saturated deployment (``queued``: demand the autoscaler adds).
- ``usage_sink(rows)`` gets ``UsageRow``s every ~10 s: per key and deployment, what was used since the
  last rows (requests answered by a replica, prompt and completion tokens).
Both are called from a worker thread, one call at a time; an exception is logged and the data dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

UNKNOWN = "_unknown"
NO_KEY = "_none"
CODES = frozenset({200, 400, 401, 404, 408, 413, 422, 429, 499, 500, 502, 503, 504})


_LABELS = {code: str(code) for code in CODES}  # a code not listed counts under its class, such as "4xx"


@dataclass(frozen=True, slots=True)
class GatewaySample:
    at: datetime
    deployment: str
    buffered: int
    inflight: int
    requests_per_s: float
    queued: int = 0


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


class Ledger:
    """What one key did on one deployment: answers by status label, and what replicas spent on it
    (``requests`` counts answers a replica gave with usage)."""

    __slots__ = ("codes", "completion", "owner", "prompt", "requests", "sent")

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.codes: dict[str, int] = {}
        self.requests = self.prompt = self.completion = 0
        self.sent = (0, 0, 0)  # the usage totals already handed to the sink

    def count(self, status: int) -> None:
        label = _LABELS.get(status) or f"{status // 100}xx"
        self.codes[label] = self.codes.get(label, 0) + 1

    def use(self, prompt: int, completion: int) -> None:
        self.requests += 1
        self.prompt += prompt
        self.completion += completion

    def unsent(self) -> bool:
        return (self.requests, self.prompt, self.completion) != self.sent


class Stats:
    """Ledgers per key and deployment, in-flight and rate counters (see the module docstring)."""

    def __init__(self) -> None:
        self.ledgers: dict[tuple[str, str], Ledger] = {}  # (key id, deployment)
        self.inflight: dict[str, int] = {}
        self._started: dict[str, int] = {}  # requests sent to replicas since the last tick
        self._completion: dict[str, int] = {}  # completion tokens per deployment at the last tick
        self.requests_per_s: dict[str, float] = {}
        self.tokens_per_s: dict[str, float] = {}
        self._tick_at: float | None = None

    def ledger(self, key_id: str, owner: str, deployment: str) -> Ledger:
        entry = self.ledgers.get((key_id, deployment))
        if entry is None:
            entry = self.ledgers[(key_id, deployment)] = Ledger(owner)
        return entry

    def count(self, deployment: str, key_id: str, status: int) -> None:
        """Count an answer the gateway gave itself."""
        self.ledger(key_id, "", deployment).count(status)

    def begin(self, deployment: str) -> None:
        self.inflight[deployment] = self.inflight.get(deployment, 0) + 1
        self._started[deployment] = self._started.get(deployment, 0) + 1

    def end(self, deployment: str) -> None:
        left = self.inflight.get(deployment, 1) - 1
        if left > 0:
            self.inflight[deployment] = left
        else:
            self.inflight.pop(deployment, None)

    def tick(
        self,
        now: float,
        at: datetime,
        deployments: Collection[str],
        buffered: Callable[[str], int],
        queued: Callable[[str], int] = lambda d: 0,
    ) -> list[GatewaySample]:
        """Rates since the last tick, and one sample per known deployment."""
        elapsed = now - self._tick_at if self._tick_at is not None else 0.0
        self._tick_at = now
        completion: dict[str, int] = {}
        for (_, deployment), entry in self.ledgers.items():
            completion[deployment] = completion.get(deployment, 0) + entry.completion
        generated = {d: n - self._completion.get(d, 0) for d, n in completion.items()}
        self.requests_per_s, self.tokens_per_s = _rates(self._started, elapsed), _rates(generated, elapsed)
        self._started, self._completion = {}, completion
        return [
            GatewaySample(
                at, d, buffered(d), self.inflight.get(d, 0), self.requests_per_s.get(d, 0.0), queued(d)
            )
            for d in sorted(deployments)
        ]

    def flush(self, at: datetime) -> list[UsageRow]:
        """Usage since the last flush, one row per key and deployment that used anything."""
        rows = []
        for (key_id, deployment), entry in self.ledgers.items():
            if entry.unsent():
                total = (entry.requests, entry.prompt, entry.completion)
                delta = [now - before for now, before in zip(total, entry.sent, strict=True)]
                rows.append(UsageRow(at, key_id, entry.owner, deployment, *delta))
                entry.sent = total
        return rows

    def prune(self, deployments: Collection[str], key_ids: Collection[str]) -> None:
        """Forget deployments and keys that are gone (usage not yet flushed stays until it is)."""
        self.ledgers = {
            (key_id, deployment): entry
            for (key_id, deployment), entry in self.ledgers.items()
            if (
                (deployment in deployments or deployment == UNKNOWN)
                and (key_id in key_ids or key_id == NO_KEY)
            )
            or entry.unsent()
        }


def _rates(counts: Mapping[str, int], elapsed: float) -> dict[str, float]:
    return {d: n / elapsed for d, n in counts.items()} if elapsed > 0 else {}
