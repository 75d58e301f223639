"""A pure parser from an engine's Prometheus ``/metrics`` text to one ``EngineStats``.

It reads vLLM's metric names (and hpcserve's engine simulator, which exposes the same ones):

- ``vllm:num_requests_running`` and ``vllm:num_requests_waiting`` (gauges, summed over engines);
- ``vllm:kv_cache_usage_perc`` (vLLM >= 0.9), else the older ``vllm:gpu_cache_usage_perc`` (0..1, averaged
  over engines);
- the ``vllm:time_to_first_token_seconds`` and ``vllm:e2e_request_latency_seconds`` histograms, whose p50/p95
  are estimated from the cumulative buckets the way PromQL's ``histogram_quantile`` does;
- the ``vllm:prompt_tokens_total`` and ``vllm:generation_tokens_total`` counters.

Quantiles from one scrape cover the engine's whole life. For a window, subtract the bucket counts of two
scrapes with ``bucket_delta`` and estimate with ``histogram_quantile``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hpcserve.errors import HpcserveError

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
KV_USAGE_OLD = "vllm:gpu_cache_usage_perc"  # deprecated in vLLM 0.9, later hidden
TTFT = "vllm:time_to_first_token_seconds"
E2E = "vllm:e2e_request_latency_seconds"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"

Buckets = tuple[tuple[float, float], ...]
"""Cumulative histogram buckets: (upper bound, count) sorted by bound, the last bound being +Inf."""


class EngineMetricsError(HpcserveError):
    """The text is not Prometheus exposition, or it lacks vLLM's scheduler gauges."""


@dataclass(frozen=True, slots=True)
class EngineStats:
    """One scrape of one engine. Quantiles are None while the histogram is empty."""

    running: int
    waiting: int
    kv_usage: float | None
    ttft_p50: float | None
    ttft_p95: float | None
    e2e_p50: float | None
    e2e_p95: float | None
    prompt_tokens_total: float
    generation_tokens_total: float
    ttft_buckets: Buckets
    e2e_buckets: Buckets


@dataclass
class _Samples:
    """Sample values by name, summed over label sets; histogram buckets by (name, bound)."""

    values: dict[str, list[float]]
    buckets: dict[str, dict[float, float]]


def parse_engine_metrics(text: str, model_name: str | None = None) -> EngineStats:
    """Parse a vLLM-style ``/metrics`` page; with ``model_name``, only series carrying that label value."""
    samples = _collect(text, model_name)
    if RUNNING not in samples.values or WAITING not in samples.values:
        raise EngineMetricsError(
            f"no {RUNNING} / {WAITING} in the metrics text"
            + (f" for model_name={model_name!r}" if model_name else "")
            + ": is this a vLLM (or hpcserve engine-sim) /metrics endpoint?"
        )
    ttft, e2e = _buckets(samples, TTFT), _buckets(samples, E2E)
    return EngineStats(
        running=round(sum(samples.values[RUNNING])),
        waiting=round(sum(samples.values[WAITING])),
        kv_usage=_mean(samples.values.get(KV_USAGE) or samples.values.get(KV_USAGE_OLD)),
        ttft_p50=histogram_quantile(ttft, 0.5),
        ttft_p95=histogram_quantile(ttft, 0.95),
        e2e_p50=histogram_quantile(e2e, 0.5),
        e2e_p95=histogram_quantile(e2e, 0.95),
        prompt_tokens_total=sum(samples.values.get(PROMPT_TOKENS, [0.0])),
        generation_tokens_total=sum(samples.values.get(GENERATION_TOKENS, [0.0])),
        ttft_buckets=ttft,
        e2e_buckets=e2e,
    )


def _collect(text: str, model_name: str | None) -> _Samples:
    from prometheus_client.parser import text_string_to_metric_families

    samples = _Samples(defaultdict(list), defaultdict(lambda: defaultdict(float)))
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if model_name is not None and s.labels.get("model_name", model_name) != model_name:
                    continue
                if s.name.endswith("_bucket") and "le" in s.labels:
                    samples.buckets[s.name.removesuffix("_bucket")][float(s.labels["le"])] += s.value
                else:
                    samples.values[s.name].append(s.value)
    except ValueError as exc:
        raise EngineMetricsError(f"the metrics text is not Prometheus exposition format: {exc}") from exc
    return samples


def _buckets(samples: _Samples, name: str) -> Buckets:
    return tuple(sorted(samples.buckets.get(name, {}).items()))


def _mean(values: Sequence[float] | None) -> float | None:
    return sum(values) / len(values) if values else None


def bucket_delta(later: Buckets, earlier: Buckets) -> Buckets:
    """The observations made between two scrapes of the same histogram (a counter reset keeps ``later``)."""
    before = dict(earlier)
    delta = tuple((le, count - before.get(le, 0.0)) for le, count in later)
    return later if any(count < 0 for _, count in delta) else delta


def histogram_quantile(buckets: Iterable[tuple[float, float]], q: float) -> float | None:
    """Estimate the q-quantile from cumulative buckets by linear interpolation inside the bucket that holds
    it, as PromQL's ``histogram_quantile`` does. A quantile in the +Inf bucket is the highest finite bound."""
    ordered = sorted(buckets)
    if not ordered or not math.isinf(ordered[-1][0]) or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower
