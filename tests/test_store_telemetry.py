"""GPU telemetry in the store (``gpu_samples``, migration 0007) on both backends: writes, windows, the newest
reading per GPU, each job's mean, and retention."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hpcserve.errors import ValidationError
from hpcserve.model.telemetry import GpuSample
from hpcserve.store import HistoryStore
from hpcserve.store.schema import Base
from tests.store_helpers import BACKENDS, scratch_database

T0 = datetime(2026, 12, 7, 18, 0, tzinfo=UTC)
GIB = 1 << 30


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with scratch_database() as url:
        yield url


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HistoryStore]:
    url = f"sqlite:///{tmp_path}/h.db" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    with HistoryStore(url) as s:
        s.upgrade()
        if request.param == "postgres":
            with s.engine.begin() as conn:
                tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
                conn.exec_driver_sql(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
        yield s


def sample(job: str, at: datetime, util: float, index: int = 0, power: float | None = 250.0) -> GpuSample:
    return GpuSample(at, job, f"GPU-{job}-{index}", index, util, 40 * GIB + index, 80 * GIB, power,
                     1410 if power is not None else None)  # fmt: skip


def test_samples_round_trip_with_their_job(store: HistoryStore) -> None:
    rows = [sample("101", T0, 37.5), sample("101", T0, 12.0, index=1, power=None)]
    assert store.add_gpu_samples(rows, user="alice", kind="inference", deployment="llama") == 2
    got = store.gpu_samples(T0)
    assert [r.sample() for r in got] == rows  # every field back as written, 64-bit memory included
    assert {(r.user, r.kind, r.deployment, r.source) for r in got} == {
        ("alice", "inference", "llama", "nvml")
    }
    assert got[1].power_w is None and got[1].sm_clock_mhz is None and got[0].at.tzinfo is not None


def test_reads_filter_by_window_job_and_user(store: HistoryStore) -> None:
    for minute in range(5):
        at = T0 + timedelta(minutes=minute)
        store.add_gpu_samples([sample("1", at, 10.0 * minute)], user="alice", kind="training")
        store.add_gpu_samples([sample("2", at, 90.0)], user="bob", kind="training")
    window = store.gpu_samples(T0 + timedelta(minutes=1), T0 + timedelta(minutes=3))
    assert [(r.job_id, r.at.minute) for r in window] == [("1", 1), ("2", 1), ("1", 2), ("2", 2)]
    assert {r.job_id for r in store.gpu_samples(None, user="bob")} == {"2"}
    assert {r.user for r in store.gpu_samples(None, job_ids=["1"])} == {"alice"}
    assert store.gpu_samples(None, job_ids=["1"], user="bob") == []


def test_latest_is_the_newest_reading_of_each_gpu(store: HistoryStore) -> None:
    for minute, util in enumerate((5.0, 6.0, 7.0)):
        at = T0 + timedelta(minutes=minute)
        store.add_gpu_samples([sample("7", at, util), sample("7", at, util + 50, index=1)],
                              user="alice", kind="training")  # fmt: skip
    store.add_gpu_samples([sample("8", T0, 99.0)], user="bob", kind="inference")
    latest = store.latest_gpu_samples(T0)
    assert [(r.job_id, r.gpu_index, r.util_pct) for r in latest] == [("7", 0, 7.0), ("7", 1, 57.0),
                                                                     ("8", 0, 99.0)]  # fmt: skip
    assert [r.job_id for r in store.latest_gpu_samples(T0, user="bob")] == ["8"]
    assert store.latest_gpu_samples(T0 + timedelta(minutes=3)) == []  # too old: nothing


def test_job_utilisation_means_every_gpu_and_prefers_nvml(store: HistoryStore) -> None:
    store.add_gpu_samples([sample("1", T0, 10.0), sample("1", T0, 30.0, index=1)], user="a", kind="training")
    store.add_gpu_samples([sample("1", T0, 99.0)], user="a", kind="training", source="sacct")
    store.add_gpu_samples([sample("2", T0, 64.0)], user="b", kind="training", source="sacct")
    store.add_gpu_samples([sample("3", T0 - timedelta(hours=1), 50.0)], user="c", kind="training")
    assert store.job_utilisation(T0 - timedelta(minutes=1)) == {"1": 20.0, "2": 64.0}
    assert store.job_utilisation(T0 - timedelta(hours=2), T0) == {"3": 50.0}


def test_bad_kind_or_source_is_refused_naming_the_choices(store: HistoryStore) -> None:
    with pytest.raises(ValidationError, match="unknown job kind 'batch': use one of training, inference"):
        store.add_gpu_samples([sample("1", T0, 1.0)], user="a", kind="batch")
    with pytest.raises(ValidationError, match="telemetry source 'dcgm'"):
        store.add_gpu_samples([sample("1", T0, 1.0)], user="a", kind="training", source="dcgm")
    assert store.gpu_samples(None) == []


def test_retention_deletes_telemetry_past_its_window_only(store: HistoryStore) -> None:
    now = T0 + timedelta(days=40)
    store.add_gpu_samples([sample("old", T0, 1.0), sample("new", now - timedelta(days=30), 2.0)],
                          user="a", kind="training")  # fmt: skip
    result = store.apply_retention(now)  # default: 31 days
    assert result.gpu_samples_deleted == 1
    assert [r.job_id for r in store.gpu_samples(None)] == ["new"]
    assert store.apply_retention(now).gpu_samples_deleted == 0
    assert store.apply_retention(now, gpu_days=7).gpu_samples_deleted == 1


def test_last_requests_is_the_newest_busy_engine_sample_of_each_replica(store: HistoryStore) -> None:
    from hpcserve.store import EngineSample

    rows = [
        EngineSample(T0, "llama", 0, waiting=0, running=2),
        EngineSample(T0 + timedelta(minutes=1), "llama", 0, waiting=1, running=0),
        EngineSample(T0 + timedelta(minutes=2), "llama", 0, waiting=0, running=0),  # idle: not a request
        EngineSample(T0 + timedelta(minutes=2), "llama", 1, waiting=0, running=0),
        EngineSample(T0 + timedelta(minutes=3), "llama", None, gateway_waiting=5, source="gw"),
        EngineSample(T0 + timedelta(minutes=3), "other", 0, running=1),
    ]
    store.add_engine_samples(rows)
    assert store.last_requests(["llama"], T0) == {("llama", 0): T0 + timedelta(minutes=1)}
    assert store.last_requests(["llama", "other"], T0 + timedelta(minutes=2)) == {
        ("other", 0): T0 + timedelta(minutes=3)
    }
