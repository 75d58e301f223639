"""``hpcserve report``: the pure bucketing and page, the API's data from a real store (what each caller
sees, the database's buckets against Python's) and the CLI through the API's route. Rendering in headless
Chromium and the real service on the cluster: tests/test_report_chromium.py."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from hpcserve.api.report import report_data
from hpcserve.errors import HpcserveError, ValidationError
from hpcserve.report import data as rd
from hpcserve.report.html import page
from hpcserve.report.render import render
from hpcserve.store import EngineSample, HistoryStore, QueueSample
from hpcserve.store.buckets import engine_buckets, queue_buckets
from tests.conftest import SITE
from tests.report_week import ALICE, BOB, CAROL, NOW, WEEK_S, api_for, week_store
from tests.store_helpers import BACKENDS, scratch_database


@pytest.fixture(scope="module")
def full_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HistoryStore]:
    with week_store(f"sqlite:///{tmp_path_factory.mktemp('report') / 'week.db'}") as store:
        yield store


@pytest.fixture(scope="module", params=BACKENDS)
def either_store(request: pytest.FixtureRequest) -> Iterator[HistoryStore]:
    """The week of data on SQLite (the module's store) and on a scratch PostgreSQL database."""
    if request.param == "sqlite":
        yield request.getfixturevalue("full_store")
        return
    with scratch_database() as url, week_store(url) as store:
        yield store


# ------------------------------------------------------------------------------------------- pure


def queue_reading(sample: QueueSample) -> rd.Reading:
    return rd.Reading(sample.partition, sample.at, {k: float(getattr(sample, k)) for k in rd.QUEUE_KEYS})


def engine_reading(sample: EngineSample) -> rd.Reading:
    key = (sample.deployment, sample.replica, sample.source)
    return rd.Reading(key, sample.at, {k: getattr(sample, k) for k in rd.ENGINE_KEYS})


def test_buckets_weigh_rollups_and_skip_missing_values() -> None:
    since = NOW - timedelta(hours=2)
    readings = [
        rd.Reading("p", since + timedelta(minutes=1), {"x": 2.0, "y": None}),
        rd.Reading("p", since + timedelta(minutes=2), {"x": 5.0, "y": 1.0}, weight=3),
        rd.Reading("p", since + timedelta(minutes=70), {"x": 9.0, "y": None}),
        rd.Reading("q", since + timedelta(minutes=3), {"x": 1.0, "y": 1.0}),
    ]
    buckets = rd.bucketed(readings, since, 3600)
    first, second = buckets["p"]
    assert first.at == since and first.weight == 4
    assert first.means == {"x": (2.0 + 5.0 * 3) / 4, "y": 1.0}
    assert second.at == since + timedelta(hours=1) and second.means == {"x": 9.0, "y": None}
    assert [b.means["x"] for b in buckets["q"]] == [1.0]


def test_bucket_width_never_finer_than_the_sampler_and_points_are_bounded() -> None:
    assert rd.bucket_width(NOW - timedelta(hours=1), NOW, 240) == rd.MIN_BUCKET_S
    assert rd.bucket_width(NOW - timedelta(days=7), NOW, 240) == 2520.0
    with pytest.raises(ValueError, match="points"):
        rd.bucket_width(NOW - timedelta(days=1), NOW, 0)


def test_deployment_sums_waiting_over_replicas_and_gateways_and_weighs_ttft() -> None:
    since = NOW - timedelta(minutes=10)
    at = since + timedelta(seconds=30)
    readings = [
        engine_reading(EngineSample(at, "d", 0, waiting=4, ttft_p50=0.1, ttft_p95=0.5)),
        engine_reading(EngineSample(at, "d", 0, waiting=2, ttft_p50=0.1, ttft_p95=0.5)),
        engine_reading(EngineSample(at, "d", 1, waiting=1, ttft_p50=0.4, ttft_p95=1.1)),
        engine_reading(EngineSample(at, "d", None, gateway_waiting=5, source="gw:1")),
        engine_reading(EngineSample(at, "other", 0, waiting=50, ttft_p50=9.0)),
    ]
    (series,) = rd.deployment_series(readings, since, 600, {"d": "alice", "unsampled": "alice"})
    (point,) = series.points
    assert (series.name, series.owner) == ("d", "alice")
    assert point.waiting == 3 + 1 + 5  # replica 0's mean, replica 1's, the gateway's
    assert point.ttft_p50_s == pytest.approx((0.1 * 2 + 0.4) / 3)
    assert point.ttft_p95_s == pytest.approx((0.5 * 2 + 1.1) / 3)


def test_partitions_come_training_first_and_know_their_allocation() -> None:
    since = NOW - timedelta(hours=1)
    parts = (("all", 2, 0), ("infer", 4, 1), ("train", 6, 3))
    samples = [QueueSample(since + timedelta(minutes=m), p, 0, pend, run, 8 - run, 8)
               for m in (0, 30) for p, run, pend in parts]  # fmt: skip
    roles = {"training": "train", "inference": "infer", "shared": "all"}
    series = rd.partition_series([queue_reading(s) for s in samples], since, 1800, roles)
    assert [(s.name, s.role) for s in series] == [
        ("train", "training"),
        ("infer", "inference"),
        ("all", "shared"),
    ]
    assert series[0].allocated_pct() == 75.0
    assert series[0].idle_gpu_hours(1800) == 2 * 2 * 0.5
    assert series[0].peak_pending_gpus() == 3


def test_the_json_round_trip_keeps_every_field(full_store: HistoryStore) -> None:
    answer = report_data(api_for(full_store), CAROL, WEEK_S)
    report = rd.from_json(answer)
    assert rd.to_json(report) == answer
    usage = rd.UsageTable("account", "USD", (rd.UsageRow("physics", 10.5, 26.25, 8.0, 2.5, 1200),))
    with_usage = replace(report, usage=usage, idle_jobs=None)
    assert rd.from_json(rd.to_json(with_usage)) == with_usage


def test_data_that_does_not_fit_is_one_line_naming_the_problem() -> None:
    with pytest.raises(HpcserveError, match=r"KeyError: 'generated_at'.*fix: use the hpcserve version"):
        rd.from_json({"since": NOW.isoformat()})


def test_the_page_escapes_every_name_from_the_data(full_store: HistoryStore) -> None:
    report = rd.from_json(report_data(api_for(full_store), CAROL, WEEK_S))
    evil = "<script>alert(1)</script>"
    dep = replace(report.deployments[0], name=evil, owner='"><img src=x onerror=alert(1)>')
    text = page(replace(report, deployments=(dep,), viewer=evil), {})
    assert "<script>" not in text and "<img" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_usage_shows_as_a_chart_and_a_table_by_cost(full_store: HistoryStore) -> None:
    report = rd.from_json(report_data(api_for(full_store), CAROL, WEEK_S))
    rows = (rd.UsageRow("physics", 100.0, 250.0, 80.0, 20.0, None), rd.UsageRow("nlp", 400.0, 1000.0))
    text = render(replace(report, usage=rd.UsageTable("account", "EUR", rows), usage_note=""))
    section = text[text.index('<section id="usage">') :]
    assert section.count('<svg class="chart"') == 1 and "Cost per account (EUR)" in section
    table = section[section.index("<table") :]
    assert table.index("nlp") < table.index("physics")  # the dearest first
    assert "1,000.00 EUR" in section and "1,250 EUR" in text  # the row, and the card's total


# ------------------------------------------------------------------------------- the API's data


@pytest.mark.parametrize("width", [2520.0, 600.0, 37.0])
def test_the_databases_buckets_are_pythons_over_the_raw_samples(
    either_store: HistoryStore, width: float
) -> None:
    """The SQL grouping (julianday on SQLite, epochs on PostgreSQL) puts every sample where Python's exact
    arithmetic does, samples on a bucket's very edge included (every 10 minutes: 600 s buckets have one at
    each edge)."""
    full_store = either_store
    since = NOW - timedelta(days=7)
    py_queue = rd.bucketed([queue_reading(s) for s in full_store.queue_samples(since=since)], since, width)
    engine = [s for d in ("alice-chat", "bob-coder") for s in full_store.engine_samples(d, since=since)]
    py_engine = rd.bucketed([engine_reading(s) for s in engine], since, width)
    sql_queue = queue_buckets(full_store, since, NOW, width)
    sql_engine = engine_buckets(full_store, ["alice-chat", "bob-coder"], since, NOW, width)
    for python, sql, keys in ((py_queue, sql_queue, rd.QUEUE_KEYS), (py_engine, sql_engine, rd.ENGINE_KEYS)):
        rows = {(r.key if len(r.key) > 1 else r.key[0], r.index): r for r in sql}
        assert len(rows) == sum(len(b) for b in python.values())
        for key, buckets in python.items():
            for bucket in buckets:
                row = rows[(key, round((bucket.at - since).total_seconds() / width))]
                assert row.count == bucket.weight
                assert {k: row.means[k] for k in keys} == pytest.approx(dict(bucket.means), nan_ok=True)


def test_a_user_sees_their_own_deployments_and_idle_jobs_and_an_admin_everyones(
    full_store: HistoryStore,
) -> None:
    api = api_for(full_store)
    alice, bob, carol = (report_data(api, c, WEEK_S) for c in (ALICE, BOB, CAROL))
    assert [d["name"] for d in alice["deployments"]] == ["alice-chat"]
    assert [d["name"] for d in bob["deployments"]] == ["bob-coder"]
    assert [d["name"] for d in carol["deployments"]] == ["alice-chat", "bob-coder"]
    assert [j["job_id"] for j in alice["idle_jobs"]] == ["5001"]
    assert [j["job_id"] for j in bob["idle_jobs"]] == ["5002"]
    assert sorted(j["job_id"] for j in carol["idle_jobs"]) == ["5001", "5002"]
    assert [b["kind"] for b in alice["busy"]] == ["training"]  # her jobs' GPU telemetry only
    assert [b["kind"] for b in bob["busy"]] == ["inference"]
    assert [b["kind"] for b in carol["busy"]] == ["training", "inference"]
    assert (alice["everyone"], carol["everyone"]) == (False, True)
    # cluster facts (squeue's and hpcserve history's): the same for everyone
    for key in ("partitions", "split", "evictions", "lost_gpu_h"):
        assert alice[key] == bob[key] == carol[key]
    assert "bob-coder" not in render(rd.from_json(alice))


def test_the_data_is_bucketed_from_a_week_of_real_shaped_samples(full_store: HistoryStore) -> None:
    report = rd.from_json(report_data(api_for(full_store), CAROL, WEEK_S))
    assert report.bucket_s == 2520.0
    train = report.partitions[0]
    assert (train.name, train.role, len(report.partitions)) == ("train", "training", 3)
    assert 200 <= len(train.points) <= 240  # 240 buckets, less the 5-hour outage
    assert all(p.total_gpus == 16 for p in train.points)
    assert [(s.training_nodes, s.inference_nodes) for s in report.split] == [(4, 4), (5, 3), (4, 4), (3, 5)]
    assert (report.evictions, report.lost_gpu_h) == (1, 1.5)
    training, inference = report.busy
    # 4 GPUs at ~85% for 4 days, then 4 at ~4% for 3 days; bob's one GPU at ~40% all week
    assert training.mean_pct == pytest.approx((85 * 4 + 4 * 3) / 7, abs=1.5)
    assert inference.mean_pct == pytest.approx(40, abs=1.5)
    assert max(p.util_pct for p in training.points[-60:]) < 15  # the idle job's stretch
    assert report.usage is None
    assert report.usage_note.startswith("usage could not be read: this service's Slurm backend cannot read")


def test_bad_periods_are_refused_naming_the_field(full_store: HistoryStore) -> None:
    api = api_for(full_store)
    with pytest.raises(ValidationError, match="since_s: -5 seconds is out of range"):
        report_data(api, ALICE, -5)
    with pytest.raises(ValidationError, match="points: 0 is out of range"):
        report_data(api, ALICE, WEEK_S, points=0)


# ------------------------------------------------------- the CLI through the API's route (no Slurm)


@pytest.fixture
def api_socket(full_store: HistoryStore) -> Iterator[Path]:
    """The service's API app with the report route, on a Unix socket in this process (the caller is this
    test's uid by SO_PEERCRED: root, an admin here). The whole service, as alice, bob and carol, is the
    cluster test's."""
    from aiohttp import web

    from hpcserve.service.http import make_api_app
    from hpcserve.service.routes_report import routes

    folder = Path(tempfile.mkdtemp(prefix="hps-report-", dir="/tmp"))  # a socket path fits 108 bytes
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_api_app(api_for(full_store), [routes], "unix"))
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.UnixSite(runner, str(folder / "api.sock")).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield folder / "api.sock"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.run_until_complete(runner.cleanup())
        loop.close()
        shutil.rmtree(folder, ignore_errors=True)


def cli(socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HPCSERVE_SITE": str(SITE), "HPCSERVE_SOCKET": str(socket)}
    return subprocess.run([sys.executable, "-m", "hpcserve", "report", *args], capture_output=True, text=True,
                          env=env, timeout=120, check=False)  # fmt: skip


def test_the_cli_fetches_the_data_through_the_api_and_writes_the_page(
    api_socket: Path, full_store: HistoryStore, tmp_path: Path
) -> None:
    out = tmp_path / "week.html"
    done = cli(api_socket, "--since", "7d", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {out}"
    text = out.read_text(encoding="utf-8")
    assert text.count('<svg class="chart"') == 3 and "alice-chat" in text and "bob-coder" in text
    as_json = cli(api_socket, "--since", "7d", "--json")
    assert json.loads(as_json.stdout) == report_data(api_for(full_store), CAROL, WEEK_S) | {"viewer": "root"}


def test_the_cli_refuses_bad_input_in_one_line(api_socket: Path, tmp_path: Path) -> None:
    bad_since = cli(api_socket, "--since", "7x")
    assert (bad_since.returncode, bad_since.stderr.strip()) == (
        2, "error: --since '7x': expected a number and a unit, e.g. 90m, 24h or 7d")  # fmt: skip
    far = cli(api_socket, "--since", "500d")
    said = (
        "error: since_s: 43200000 seconds is out of range "
        "(fix: more than 0, at most 400 days, e.g. --since 7d)"
    )
    assert (far.returncode, far.stderr.strip()) == (2, said)
    unwritable = cli(api_socket, "-o", str(tmp_path / "missing" / "r.html"))
    assert unwritable.returncode == 1
    assert "cannot write" in unwritable.stderr and "fix: pick a writable path with -o" in unwritable.stderr
    nobody = cli(tmp_path / "none.sock", "-o", str(tmp_path / "r.html"))
    assert nobody.returncode == 69 and "cannot reach the hpcserve service" in nobody.stderr
