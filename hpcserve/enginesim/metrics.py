"""The engine simulator's Prometheus metrics, under vLLM's names, in a registry of its own per app.

Every series carries the labels vLLM's V1 engine gives them: ``model_name`` (the served model name) and
``engine`` (always "0": one simulated engine core). The histogram buckets are the ones vLLM uses, so
dashboards and ``parse_engine_metrics`` read both alike.

Exposed:
- gauges ``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc`` (the
  current name) and ``vllm:gpu_cache_usage_perc`` (its pre-0.9 name, same value, for older dashboards);
- counters ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``,
  ``vllm:request_success_total{finished_reason}``;
- histograms ``vllm:time_to_first_token_seconds``, ``vllm:e2e_request_latency_seconds``;
- gauge ``vllm:engine_sleep_state{sleep_state}``, one series per state ("awake", "weights_offloaded",
  "discard_all"), 1 for the current one and 0 for the others (so awake=0 means asleep); like vLLM's
  ``PrometheusStatLogger``, exported whether or not sleep mode is enabled, awake by default.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LABELS = ("model_name", "engine")
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
FINISH_REASONS = ("stop", "length", "abort")
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")  # awake, sleep level 1, sleep level 2


@dataclass(frozen=True, slots=True)
class Load:
    """What the gauges show, read from the scheduler at scrape time."""

    running: int
    waiting: int
    kv_usage: float


class SimMetrics:
    """The labelled children, bound once; ``render`` sets the gauges and returns the exposition text."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, served_model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        v = (served_model_name, "0")
        self._running = Gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", LABELS, registry=r
        ).labels(*v)
        self._waiting = Gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", LABELS, registry=r
        ).labels(*v)
        self._kv = Gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", LABELS, registry=r
        ).labels(*v)
        self._kv_old = Gauge(
            "vllm:gpu_cache_usage_perc",
            "GPU KV-cache usage. 1 means 100 percent usage. "
            "DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
            LABELS,
            registry=r,
        ).labels(*v)
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", LABELS, registry=r
        ).labels(*v)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", LABELS, registry=r
        ).labels(*v)
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            LABELS,
            registry=r,
            buckets=TTFT_BUCKETS,
        ).labels(*v)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            LABELS,
            registry=r,
            buckets=LATENCY_BUCKETS,
        ).labels(*v)
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            (*LABELS, "finished_reason"),
            registry=r,
        )
        self.success = {reason: success.labels(*v, reason) for reason in FINISH_REASONS}
        sleep = Gauge(
            "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; "
            "weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
            (*LABELS, "sleep_state"),
            registry=r,
        )
        self._sleep = {state: sleep.labels(*v, state) for state in SLEEP_STATES}
        self.set_sleep_level(0)

    def set_sleep_level(self, level: int) -> None:
        """Show sleep level 0 (awake), 1 (weights_offloaded) or 2 (discard_all)."""
        for i, gauge in enumerate(self._sleep.values()):
            gauge.set(1 if i == level else 0)

    def render(self, load: Load) -> bytes:
        self._running.set(load.running)
        self._waiting.set(load.waiting)
        self._kv.set(load.kv_usage)
        self._kv_old.set(load.kv_usage)
        return generate_latest(self.registry)
