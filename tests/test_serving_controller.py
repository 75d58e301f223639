"""The serving controller's scrape: every ready or draining replica's engine at once (a tick waits for the
slowest engine, not for the sum of their timeouts); engines that do not answer are left out."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from hpcserve.serving.controller import Scrape, ServingController
from hpcserve.serving.engine_stats import EngineStats
from hpcserve.store import HistoryStore

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def stats(waiting: int) -> EngineStats:
    return EngineStats(running=1, waiting=waiting, kv_usage=0.5, ttft_p50=0.1, ttft_p95=0.2, e2e_p50=1.0,
                       e2e_p95=2.0, prompt_tokens_total=0, generation_tokens_total=0, ttft_buckets=(),
                       e2e_buckets=())  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HistoryStore]:
    with HistoryStore(f"sqlite:///{tmp_path}/h.db") as s:
        s.upgrade()
        s.create_deployment("llm", "alice", {}, 5)
        for i, state in enumerate(["ready", "ready", "draining", "ready", "pending"]):
            s.upsert_replica("llm", i, job_id=str(100 + i), state=state, url=f"http://n{i}:80{i}")
        yield s


def controller(store: HistoryStore, scrape: Scrape) -> ServingController:
    unused: Any = None  # a scrape needs neither Slurm nor a submitter
    return ServingController(store=store, client=unused, submitter=lambda: unused, replica_dir=Path("/none"),
                             ready_timeout_s=60, scrape=scrape, service_user="root")  # fmt: skip


def test_engines_are_scraped_at_once_and_silent_ones_left_out(store: HistoryStore) -> None:
    together = threading.Barrier(4, timeout=10)  # breaks (and the test fails) unless all four wait at once

    def scrape(url: str) -> EngineStats | None:
        together.wait()
        index = int(url.rsplit("80", 1)[1])
        return None if index == 3 else stats(waiting=index)

    got = controller(store, scrape)._scrape("llm", store.replicas("llm"), NOW)

    assert {i: s.waiting for i, s in got.items()} == {0: 0, 1: 1, 2: 2}  # 3 silent, 4 not ready
    assert sorted((s.replica, s.waiting) for s in store.engine_samples("llm")) == [(0, 0), (1, 1), (2, 2)]


def test_one_engine_is_scraped_in_the_tick_thread(store: HistoryStore) -> None:
    for i in range(1, 5):
        store.upsert_replica("llm", i, state="pending")
    threads: list[str] = []

    def scrape(url: str) -> EngineStats | None:
        threads.append(threading.current_thread().name)
        return stats(waiting=7)

    got = controller(store, scrape)._scrape("llm", store.replicas("llm"), NOW)
    assert {i: s.waiting for i, s in got.items()} == {0: 7} and threads == [threading.current_thread().name]
