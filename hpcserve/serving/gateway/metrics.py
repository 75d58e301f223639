"""Prometheus metrics of one gateway app, in its own registry (no module-global state).

Families (all ``hpcserve_gateway_*``; ``model`` is the deployment's name, as the gateway routes it):
- ``requests_total{model,key,code}``, ``prompt_tokens_total{model,key}``,
  ``completion_tokens_total{model,key}``: counters, read from ``Stats`` at scrape time (tokens/s:
  ``rate(hpcserve_gateway_completion_tokens_total[1m])``);
- ``queued_requests{model}`` (everything waiting in this gateway: for a ready replica or for a slot),
  ``buffered_requests{model}`` (the scale-from-zero queue), ``inflight_requests{model}``,
  ``requests_per_second{model}``, ``completion_tokens_per_second{model}`` (the gateway's own smoothed
  rates, as the autoscaler sees them): gauges, likewise;
- ``ttft_seconds{model}`` (request received to first byte sent), ``request_seconds{model}`` (end to
  end): histograms;
- overload (queue.py): ``waiting_requests{model,priority}`` (waiting for a slot),
  ``drain_rate_requests_per_second{model}`` (requests/s a saturated deployment finishes; absent while
  unknown) gauges; ``shed_total{model,priority,reason}``, ``fallback_total{model,fallback}``,
  ``overload_capped_total{model}`` (max_tokens lowered by the overload cap) counters;
- hold-and-wake (wake.py, which registers its own collector here): ``wakes_total{model,result}``,
  ``wake_wait_seconds{model}`` (histogram), ``wake_held_requests{model}``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Collection, Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from hpcserve.model.gateway import PRIORITIES
from hpcserve.serving.gateway.queue import Gate
from hpcserve.serving.gateway.stats import UNKNOWN, Stats

PREFIX = "hpcserve_gateway_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _StatsCollector(Collector):
    def __init__(
        self,
        stats: Stats,
        deployments: Callable[[], Collection[str]],
        buffered: Callable[[str], int],
        gate: Gate | None = None,
    ):
        self.stats, self.deployments, self.buffered, self.gate = stats, deployments, buffered, gate

    def queued(self, deployment: str) -> int:
        return self.buffered(deployment) + (self.gate.waiting(deployment) if self.gate is not None else 0)

    def collect(self) -> Iterator[Metric]:
        yield from self._counters()
        yield from self._gauges()

    def _counters(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            PREFIX + "requests", "Requests answered", labels=["model", "key", "code"]
        )
        ledgers = sorted(self.stats.ledgers.items())
        for (key, model), entry in ledgers:
            for code, n in sorted(entry.codes.items()):
                requests.add_metric([model, key, code], n)
        prompt = CounterMetricFamily(PREFIX + "prompt_tokens", "Prompt tokens used", labels=["model", "key"])
        completion = CounterMetricFamily(
            PREFIX + "completion_tokens", "Completion tokens generated", labels=["model", "key"]
        )
        for (key, model), entry in ledgers:
            if entry.requests:
                prompt.add_metric([model, key], entry.prompt)
                completion.add_metric([model, key], entry.completion)
        return iter((requests, prompt, completion))

    def _gauges(self) -> Iterator[Metric]:
        names = sorted(self.deployments())
        stats = self.stats
        values: list[tuple[str, str, Callable[[str], float]]] = [
            (
                "queued_requests",
                "Requests waiting in the gateway (for a ready replica or a slot)",
                self.queued,
            ),
            ("buffered_requests", "Requests waiting for a ready replica", self.buffered),
            ("inflight_requests", "Requests being answered by a replica", lambda d: stats.inflight.get(d, 0)),
            (
                "requests_per_second",
                "Requests sent to replicas per second (smoothed)",
                lambda d: stats.requests_per_s.get(d, 0.0),
            ),
            (
                "completion_tokens_per_second",
                "Completion tokens per second (smoothed)",
                lambda d: stats.tokens_per_s.get(d, 0.0),
            ),
        ]
        for name, doc, value in values:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model"])
            for d in names:
                family.add_metric([d], value(d))
            yield family


class Buckets:
    """One histogram's counts. ``observe`` is a bisect and two additions: prometheus_client's Histogram
    takes a lock and scans its buckets in Python for every observation, a cost on every request here."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        edges = [*(repr(float(b)) for b in self.bounds), "+Inf"]
        return list(zip(edges, accumulate(self.counts), strict=True))


class _OverloadCollector(Collector):
    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def collect(self) -> Iterator[Metric]:
        lanes = sorted(self.gate.lanes.items())
        queued = GaugeMetricFamily(PREFIX + "waiting_requests", "Requests waiting for a slot",
                                   labels=["model", "priority"])  # fmt: skip
        rate = GaugeMetricFamily(PREFIX + "drain_rate_requests_per_second",
                                 "Requests/s a saturated deployment finishes", labels=["model"])  # fmt: skip
        shed = CounterMetricFamily(PREFIX + "shed", "Requests shed (503) under overload",
                                   labels=["model", "priority", "reason"])  # fmt: skip
        fallback = CounterMetricFamily(PREFIX + "fallback", "Requests sent to the fallback deployment",
                                       labels=["model", "fallback"])  # fmt: skip
        capped = CounterMetricFamily(PREFIX + "overload_capped", "Requests whose max_tokens the overload "
                                     "cap lowered", labels=["model"])  # fmt: skip
        for name, lane in lanes:
            for priority in PRIORITIES:
                queued.add_metric([name, priority], lane.queue.depth(priority))
            drain = self.gate.rate(name)
            if drain is not None:
                rate.add_metric([name], drain)
            for (priority, reason), n in sorted(lane.shed.items()):
                shed.add_metric([name, priority, reason], n)
            for target, n in sorted(lane.fallbacks.items()):
                fallback.add_metric([name, target], n)
            capped.add_metric([name], lane.capped)
        return iter((queued, rate, shed, fallback, capped))


class GatewayMetrics:
    """The registry, the two latency histograms per model and the rendering of /metrics."""

    def __init__(
        self,
        stats: Stats,
        deployments: Callable[[], Collection[str]],
        buffered: Callable[[str], int],
        gate: Gate | None = None,
    ):
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(stats, deployments, buffered, gate))
        if gate is not None:
            self.registry.register(_OverloadCollector(gate))
        self.histograms: dict[str, tuple[Buckets, Buckets]] = {}  # model -> (ttft, latency)
        self.registry.register(_HistogramCollector(self.histograms))

    def observe(self, model: str, ttft: float | None, total: float) -> None:
        pair = self.histograms.get(model)
        if pair is None:
            pair = self.histograms[model] = (Buckets(TTFT_BUCKETS), Buckets(LATENCY_BUCKETS))
        if ttft is not None:
            pair[0].observe(ttft)
        pair[1].observe(total)

    def prune(self, deployments: Collection[str]) -> None:
        """Drop the histograms of deployments that are gone."""
        for model in [m for m in self.histograms if m not in deployments and m != UNKNOWN]:
            del self.histograms[model]

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _HistogramCollector(Collector):
    def __init__(self, histograms: dict[str, tuple[Buckets, Buckets]]) -> None:
        self.histograms = histograms

    def collect(self) -> Iterator[Metric]:
        names = (("ttft_seconds", "Time to first byte sent"), ("request_seconds", "End-to-end request time"))
        for i, (name, doc) in enumerate(names):
            family = HistogramMetricFamily(PREFIX + name, doc, labels=["model"])
            for model, pair in sorted(self.histograms.items()):
                family.add_metric([model], pair[i].cumulative(), pair[i].total)
            yield family
