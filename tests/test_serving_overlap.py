"""lending: overlap at the serving controller: the pre-warm floor read from the stored engine samples, and
the controller launching replicas up to it (moves mode has no floor: ``prewarm`` None)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from hpcserve.serving.overlap import PrewarmSource
from hpcserve.store import EngineSample, HistoryStore
from tests.test_serving_controller import NOW, controller, serve


@pytest.fixture
def db(tmp_path: Path) -> Iterator[HistoryStore]:
    with HistoryStore(f"sqlite:///{tmp_path}/h.db", admins=["root"]) as s:
        s.upgrade()
        yield s


def test_controller_launches_up_to_the_forecast_floor(db: HistoryStore) -> None:
    serve(db, "llm")  # min_replicas 0, no traffic: the autoscaler alone wants none
    ctl = controller(db)
    ctl.tick()
    assert db.replicas("llm") == []
    ctl.prewarm = lambda deployment, now: 3
    ctl.tick()
    assert sorted(r.index for r in db.replicas("llm")) == [0, 1, 2]
    assert db.get_deployment("llm").desired_replicas == 3  # type: ignore[union-attr]


def test_prewarm_source_forecasts_the_stored_daily_burst(db: HistoryStore) -> None:
    serve(db, "llm", max_replicas=8)
    burst = NOW.replace(hour=14, minute=0)
    start = burst - timedelta(days=3)
    rows = []
    for k in range(3 * 86_400 // 600):
        at = start + timedelta(seconds=600 * k)
        rows.append(EngineSample(at, "llm", 0, waiting=0, running=40 if at.hour == 14 else 1))
        rows.append(EngineSample(at, "llm", None, gateway_waiting=0))
    db.add_engine_samples(rows)
    deployment = db.get_deployment("llm")
    assert deployment is not None
    source = PrewarmSource(db, horizon_s=1200)
    quiet = source(deployment, burst - timedelta(hours=4))
    assert quiet <= 1
    source.cached.clear()
    ahead = source(deployment, burst - timedelta(seconds=600))
    assert ahead >= 2  # 40 running, a simulator replica runs about 9 at 90%: several replicas ahead of it
