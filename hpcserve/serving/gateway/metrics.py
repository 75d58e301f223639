"""Prometheus metrics of one gateway app, in its own registry (no module-global state).

Families (all ``hpcserve_gateway_*``):
- ``requests_total{model,key,code}``, ``prompt_tokens_total{model,key}``,
  ``completion_tokens_total{model,key}``: counters, read from ``Stats`` at scrape time;
- ``buffered{deployment}`` (the scale-from-zero queue), ``inflight{deployment}``,
  ``requests_per_s{deployment}``, ``tokens_per_s{deployment}`` (completion tokens): gauges, likewise;
- ``ttft_seconds{model}`` (request received to first byte sent), ``request_seconds{model}`` (end to
  end): histograms.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hpcserve.serving.gateway.stats import UNKNOWN, Stats

PREFIX = "hpcserve_gateway_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _StatsCollector(Collector):
    def __init__(
        self, stats: Stats, deployments: Callable[[], Collection[str]], buffered: Callable[[str], int]
    ):
        self.stats, self.deployments, self.buffered = stats, deployments, buffered

    def collect(self) -> Iterator[Metric]:
        yield from self._counters()
        yield from self._gauges()

    def _counters(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            PREFIX + "requests", "Requests answered", labels=["model", "key", "code"]
        )
        for (model, key, code), n in sorted(self.stats.requests.items()):
            requests.add_metric([model, key, code], n)
        prompt = CounterMetricFamily(PREFIX + "prompt_tokens", "Prompt tokens used", labels=["model", "key"])
        completion = CounterMetricFamily(
            PREFIX + "completion_tokens", "Completion tokens generated", labels=["model", "key"]
        )
        for (key, model), u in sorted(self.stats.usage.items()):
            prompt.add_metric([model, key], u.prompt)
            completion.add_metric([model, key], u.completion)
        return iter((requests, prompt, completion))

    def _gauges(self) -> Iterator[Metric]:
        names = sorted(self.deployments())
        stats = self.stats
        values: list[tuple[str, str, Callable[[str], float]]] = [
            ("buffered", "Requests waiting for a ready replica", self.buffered),
            ("inflight", "Requests being answered by a replica", lambda d: stats.inflight.get(d, 0)),
            (
                "requests_per_s",
                "Requests sent to replicas per second",
                lambda d: stats.requests_per_s.get(d, 0.0),
            ),
            ("tokens_per_s", "Completion tokens per second", lambda d: stats.tokens_per_s.get(d, 0.0)),
        ]
        for name, doc, value in values:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["deployment"])
            for d in names:
                family.add_metric([d], value(d))
            yield family


class GatewayMetrics:
    """The registry, the two latency histograms and the rendering of /metrics."""

    def __init__(
        self, stats: Stats, deployments: Callable[[], Collection[str]], buffered: Callable[[str], int]
    ):
        self.registry = CollectorRegistry()
        self.ttft = Histogram(
            PREFIX + "ttft_seconds",
            "Time to first byte sent",
            ["model"],
            registry=self.registry,
            buckets=TTFT_BUCKETS,
        )
        self.latency = Histogram(
            PREFIX + "request_seconds", "End-to-end request time", ["model"], registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.registry.register(_StatsCollector(stats, deployments, buffered))
        self._observed: dict[str, tuple[Histogram, Histogram]] = {}  # model -> its (ttft, latency) children

    def observe(self, model: str, ttft: float | None, total: float) -> None:
        children = self._observed.get(model)
        if children is None:
            children = self._observed[model] = (self.ttft.labels(model), self.latency.labels(model))
        if ttft is not None:
            children[0].observe(ttft)
        children[1].observe(total)

    def prune(self, deployments: Collection[str]) -> None:
        """Drop the histograms of deployments that are gone."""
        for model in [m for m in self._observed if m not in deployments and m != UNKNOWN]:
            del self._observed[model]
            for histogram in (self.ttft, self.latency):
                with contextlib.suppress(KeyError):
                    histogram.remove(model)

    def render(self) -> bytes:
        return generate_latest(self.registry)
