"""``parse_engine_metrics`` on a vLLM /metrics page (tests/data/vllm_metrics.txt) and on edge cases."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from hpcserve.serving.engine_stats import (
    EngineMetricsError,
    bucket_delta,
    histogram_quantile,
    parse_engine_metrics,
)

VLLM_SAMPLE = Path(__file__).parent / "data" / "vllm_metrics.txt"
INF = math.inf


def test_parses_the_vllm_sample() -> None:
    stats = parse_engine_metrics(VLLM_SAMPLE.read_text())
    assert (stats.running, stats.waiting) == (3, 2)
    assert stats.kv_usage == pytest.approx(0.13671875)
    assert (stats.prompt_tokens_total, stats.generation_tokens_total) == (21504.0, 9871.0)
    # ttft: 43 observations; the median (rank 21.5) lies in (0.04, 0.06] holding ranks 15..24
    assert stats.ttft_p50 == pytest.approx(0.04 + 0.02 * 6.5 / 9)
    assert stats.ttft_p95 == pytest.approx(0.1 + 0.15 * (0.95 * 43 - 33) / 8)
    assert stats.e2e_p50 == pytest.approx(1.5 + 0.5 * 2 / 11)
    assert stats.e2e_p95 == pytest.approx(4.5)
    assert stats.ttft_buckets[-1] == (INF, 43.0) and stats.e2e_buckets[-1] == (INF, 40.0)


def test_model_name_filter() -> None:
    text = VLLM_SAMPLE.read_text()
    assert parse_engine_metrics(text, model_name="Qwen/Qwen3-0.6B").running == 3
    with pytest.raises(EngineMetricsError, match="model_name='other'"):
        parse_engine_metrics(text, model_name="other")


def test_old_kv_gauge_and_engines_summed() -> None:
    text = "\n".join(
        [
            "# TYPE vllm:num_requests_running gauge",
            'vllm:num_requests_running{engine="0",model_name="m"} 2',
            'vllm:num_requests_running{engine="1",model_name="m"} 3',
            "# TYPE vllm:num_requests_waiting gauge",
            'vllm:num_requests_waiting{model_name="m"} 7',
            "# TYPE vllm:gpu_cache_usage_perc gauge",
            'vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.2',
            'vllm:gpu_cache_usage_perc{engine="1",model_name="m"} 0.4',
            "",
        ]
    )
    stats = parse_engine_metrics(text)
    assert (stats.running, stats.waiting) == (5, 7)
    assert stats.kv_usage == pytest.approx(0.3)
    assert stats.ttft_p50 is None and stats.ttft_buckets == ()
    assert stats.prompt_tokens_total == 0.0


@pytest.mark.parametrize("text", ["process_open_fds 3\n", "", "not prometheus {{{\n"])
def test_not_an_engine(text: str) -> None:
    with pytest.raises(EngineMetricsError):
        parse_engine_metrics(text)


def test_histogram_quantile_edges() -> None:
    assert histogram_quantile([], 0.5) is None
    assert histogram_quantile([(1.0, 0.0), (INF, 0.0)], 0.5) is None
    assert histogram_quantile([(1.0, 0.0), (2.0, 4.0), (INF, 4.0)], 0.5) == pytest.approx(1.5)
    assert histogram_quantile([(1.0, 0.0), (2.0, 4.0), (INF, 10.0)], 0.95) == 2.0  # in +Inf: highest bound
    assert histogram_quantile([(0.5, 2.0), (INF, 2.0)], 0.5) == pytest.approx(0.25)  # first bucket from 0


def test_bucket_delta_windows_and_resets() -> None:
    earlier = ((1.0, 2.0), (2.0, 4.0), (INF, 4.0))
    later = ((1.0, 2.0), (2.0, 9.0), (INF, 10.0))
    assert bucket_delta(later, earlier) == ((1.0, 0.0), (2.0, 5.0), (INF, 6.0))
    assert histogram_quantile(bucket_delta(later, earlier), 0.5) == pytest.approx(1.6)
    assert bucket_delta(earlier, later) == earlier  # the engine restarted: counters went down


def test_the_service_scrapes_every_engine_over_kept_alive_connections() -> None:
    """One client for every scrape (a client per call built an SSL context and a pool each time: the
    service's memory grew ~30 MiB over a 30-minute soak): ten scrapes of an engine use one connection."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from hpcserve.serving.wiring import scrape_metrics

    body = (Path(__file__).parent / "data" / "vllm_metrics.txt").read_bytes()
    peers: set[tuple[str, int]] = set()

    class Engine(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            peers.add(self.client_address)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Engine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert all(scrape_metrics(url) is not None for _ in range(10))
        assert len(peers) == 1
    finally:
        server.shutdown()
