"""``hpcserve report``: the pure bucketing and page, the API's data from a real store (what each caller
sees), the page rendered by Debian's headless Chromium (charts painted, nothing broken, an empty store
said in words), and, on the cluster, the CLI through the real service as alice, bob and carol."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from hpcserve.api.caller import Caller
from hpcserve.api.context import ApiContext
from hpcserve.api.report import report_data
from hpcserve.api.telemetry import FLAGS_STATE
from hpcserve.config import load_policy, load_site_config
from hpcserve.errors import HpcserveError, ValidationError
from hpcserve.model.telemetry import GpuSample, IdleFlag
from hpcserve.report import data as rd
from hpcserve.report.html import page
from hpcserve.report.render import render
from hpcserve.store import EngineSample, HistoryStore, LostWork, NewStep, QueueSample
from hpcserve.store.buckets import engine_buckets, queue_buckets
from hpcserve.telemetry.idle import flag_to_json
from tests.api_fixtures import ApiService
from tests.conftest import POLICY, SITE
from tests.store_helpers import BACKENDS, scratch_database

NOW = datetime(2026, 12, 7, 18, 0, tzinfo=UTC)
WEEK_S = 7 * 86400.0
CHROMIUM = Path("/usr/bin/chromium")
ALICE = Caller(1001, "alice", frozenset({"alice"}))
BOB = Caller(1002, "bob", frozenset({"bob"}))
CAROL = Caller(1003, "carol", frozenset({"carol", "hpcadmin"}))  # an admin through @hpcadmin


class NoSlurm:
    """A Slurm client with no methods: the report's store-backed tests never reach Slurm (usage, which
    reads sacct, then says in words that it could not be read)."""

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"the report's unit tests do not call Slurm ({name})")


# ------------------------------------------------------------------------------------ a week of data


def populate(store: HistoryStore, clock: list[datetime], deployments: bool = True) -> None:
    """A week up to ``clock[0]`` (the store's clock; the moves set it back for each): 10-minute samples
    with a daily cycle and a 5-hour outage, two deployments (alice's and bob's) with two replicas and a
    gateway each, GPU telemetry, three node moves, one eviction and two idle flags. ``deployments``
    False: their rows are left to the caller (the cluster test serves them through the API)."""
    now = clock[0]
    rng = random.Random(13)  # noqa: S311 - repeatable noise, not a secret
    queue, engine = [], []
    for i in range(7 * 144):
        at = now - timedelta(days=7) + timedelta(minutes=10 * i)
        if timedelta(days=2) < now - at < timedelta(days=2, hours=5):
            continue
        day = 0.5 + 0.5 * math.sin(2 * math.pi * (at.hour - 8) / 24)
        for name, total, base in (("train", 16, 0.55), ("infer", 16, 0.2), ("all", 32, 0.4)):
            run = min(total, round(total * (base + 0.45 * day * rng.random())))
            pending = round(8 * day * rng.random()) if name != "infer" else 0
            queue.append(QueueSample(at, name, rng.randint(0, 4), pending, run, total - run, total))
        for dep, scale in (("alice-chat", 1.0), ("bob-coder", 0.5)):
            for rep in (0, 1):
                engine.append(EngineSample(
                    at, dep, rep, waiting=round(6 * day * scale * rng.random()), running=4, kv_usage=0.4,
                    ttft_p50=0.08 + 0.25 * day * scale * rng.random(),
                    ttft_p95=0.3 + 1.2 * day * scale * rng.random(), tokens_per_s=300.0))  # fmt: skip
            engine.append(EngineSample(at, dep, None, gateway_waiting=round(3 * day * rng.random()),
                                       source="login1:8080"))  # fmt: skip
    store.add_queue_samples(queue)
    store.add_engine_samples(engine)
    add_gpu_telemetry(store, rng, now)
    if deployments:
        store.create_deployment("alice-chat", "alice", {"model": "m"}, 2, served_model_name="a")
        store.create_deployment("bob-coder", "bob", {"model": "m"}, 2, served_model_name="b")
    for days, node, src, dst in ((5, "node5", "inference", "training"), (3, "node5", "training", "inference"),
                                 (1.2, "node3", "training", "inference")):  # fmt: skip
        clock[0] = now - timedelta(days=days)
        plan = store.create_plan("test", [{"node": node, "dst": dst}], [NewStep(node, src, dst, "move")])
        store.start_step(plan, 0)
        store.mark_step(plan, 0, "done")
    clock[0] = now
    store.add_lost_work(
        [LostWork(now - timedelta(days=2), "4211", "bob", "node5", 4, 5400.0, "alice-chat", "43")]
    )
    flags = [IdleFlag("5001", "alice", "training", "GPUs averaged 4% for 30 min (< 20%)",
                      now - timedelta(hours=3), 4, 12.0, 4.0),
             IdleFlag("5002", "bob", "inference", "served no request for 30 min", now - timedelta(hours=1),
                      1, 1.0, None)]  # fmt: skip
    store.put_state(FLAGS_STATE, {"evaluated_at": now.isoformat(), "flags": [flag_to_json(f) for f in flags]})


def add_gpu_telemetry(store: HistoryStore, rng: random.Random, now: datetime) -> None:
    """NVML readings every 10 minutes: alice's training job 5000 (4 GPUs, busy, days 7 to 3 ago), her
    job 5001 (4 GPUs at ~4%, the last 3 days: flagged idle) and bob's replica job 5002 (1 GPU, ~40%)."""
    jobs = (("5000", "alice", "training", 4, 7.0, 3.0, 85.0), ("5001", "alice", "training", 4, 3.0, 0.0, 4.0),
            ("5002", "bob", "inference", 1, 7.0, 0.0, 40.0))  # fmt: skip
    for job, user, kind, gpus, start_d, end_d, mean in jobs:
        samples = []
        at = now - timedelta(days=start_d)
        while at < now - timedelta(days=end_d):
            samples += [GpuSample(at, job, f"GPU-{job}-{i}", i, max(0.0, min(100.0, rng.gauss(mean, 6))),
                                  30 << 30, 80 << 30, 250.0, 1410) for i in range(gpus)]  # fmt: skip
            at += timedelta(minutes=10)
        store.add_gpu_samples(
            samples, user=user, kind=kind, deployment="bob-coder" if user == "bob" else None
        )


def api_for(store: HistoryStore) -> ApiContext:
    site = load_site_config(SITE).model_copy(update={"admins": ["root", "@hpcadmin"]})
    return ApiContext(site, load_policy(POLICY), store, NoSlurm(), clock=lambda: NOW)


@pytest.fixture(scope="module")
def full_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HistoryStore]:
    clock = [NOW]
    path = tmp_path_factory.mktemp("report") / "full.db"
    with HistoryStore(f"sqlite:///{path}", clock=lambda: clock[0]) as store:
        store.upgrade()
        populate(store, clock)
        yield store


@pytest.fixture(scope="module", params=BACKENDS)
def either_store(request: pytest.FixtureRequest) -> Iterator[HistoryStore]:
    """The week of data on SQLite (the module's store) and on a scratch PostgreSQL database."""
    if request.param == "sqlite":
        yield request.getfixturevalue("full_store")
        return
    clock = [NOW]
    with scratch_database() as url, HistoryStore(url, clock=lambda: clock[0]) as store:
        store.upgrade()
        populate(store, clock)
        yield store


@pytest.fixture
def empty_store(tmp_path: Path) -> Iterator[HistoryStore]:
    with HistoryStore(f"sqlite:///{tmp_path / 'empty.db'}") as store:
        store.upgrade()
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


# --------------------------------------------------------------------------- in headless Chromium


class _Dom(HTMLParser):
    """What the rendered DOM holds: each <svg>'s count of drawn children, each <img>'s src, every
    reference to another resource, and the text."""

    def __init__(self) -> None:
        super().__init__()
        self.svgs: list[int] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self.text: list[str] = []
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "svg":
            self._depth += 1
            if self._depth == 1:
                self.svgs.append(0)
        elif self._depth and tag in ("path", "line", "rect", "polyline", "use"):
            self.svgs[-1] += 1
        if tag == "img":
            self.images.append(values.get("src") or "")
        for name in ("src", "href", "xlink:href"):
            value = values.get(name) or ""
            if value and not value.startswith(("data:", "#")):
                self.external.append(f"<{tag} {name}={value}>")
        if tag == "link":
            self.external.append("<link>")

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._depth -= 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def chromium(page_file: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if not CHROMIUM.exists():
        pytest.fail(
            "Debian's chromium is not installed (fix: apt-get install chromium; scripts/bootstrap.sh)"
        )
    argv = [str(CHROMIUM), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={profile}", *args, page_file.as_uri()]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def screenshot_and_dom(html: str, folder: Path, height: int = 2400) -> tuple[Path, _Dom]:
    page_file = folder / "report.html"
    page_file.write_text(html, encoding="utf-8")
    shot = folder / "report.png"
    chromium(page_file, folder / "profile", f"--screenshot={shot}", f"--window-size=1280,{height}")
    dom = _Dom()
    dom.feed(chromium(page_file, folder / "profile", "--dump-dom").stdout)
    return shot, dom


def pixels(shot: Path) -> Any:
    """The screenshot's pixels, one RGB row each (numpy and Pillow: matplotlib's own dependencies)."""
    import numpy as np
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        return np.asarray(image.convert("RGB"), dtype=np.int16).reshape(-1, 3)


def colours(rgb: Any) -> int:
    import numpy as np

    return len(np.unique(rgb, axis=0))


def near(rgb: Any, hex_colour: str, tolerance: int = 40) -> int:
    """How many pixels are within ``tolerance`` (summed over R, G, B) of ``hex_colour``."""
    want = [int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)]
    return int((abs(rgb - want).sum(axis=1) <= tolerance).sum())


def test_the_report_renders_its_charts_in_headless_chromium(full_store: HistoryStore, tmp_path: Path) -> None:
    shot, dom = screenshot_and_dom(
        render(rd.from_json(report_data(api_for(full_store), CAROL, WEEK_S))), tmp_path
    )
    assert len(dom.svgs) == 3 and all(children > 20 for children in dom.svgs)  # utilisation, queue, TTFT
    for src in dom.images:  # none today; any one added must be an inline image that decodes
        assert src.startswith("data:image/") and base64.b64decode(src.split(",", 1)[1], validate=True)
    assert dom.external == []
    text = " ".join(dom.text)
    assert "Where the GPUs went" in text and "30 Nov 2026 18:00 UTC to 07 Dec 2026 18:00 UTC" in text
    assert "GPUs averaged 4% for 30 min" in text and "No data." in text  # idle flags; usage without sacct
    rgb = pixels(shot)
    assert colours(rgb) > 500  # anti-aliased lines, text and fills: not a blank page
    training_blue, inference_orange = near(rgb, "#0072B2"), near(rgb, "#E69F00")
    assert training_blue > 5000 and inference_orange > 5000  # the lines and the split's areas were painted
    shutil.copy(shot, tmp_path.parent / "report-sample.png")


def test_an_empty_store_gives_a_page_that_says_so_in_words(empty_store: HistoryStore, tmp_path: Path) -> None:
    shot, dom = screenshot_and_dom(
        render(rd.from_json(report_data(api_for(empty_store), ALICE, WEEK_S))), tmp_path
    )
    assert dom.svgs == [] and dom.images == [] and dom.external == []
    text = " ".join(" ".join(dom.text).split())
    assert "No data. The service recorded no queue samples from 30 Nov 2026 18:00 UTC" in text
    assert "No data. Alice's deployments had no engine samples in this period" in text
    assert "No data. None of alice's jobs is flagged idle now." in text
    rgb = pixels(shot)
    assert colours(rgb) > 20  # the page itself rendered (text, boxes)
    assert near(rgb, "#0072B2") < 5000  # no chart lines: only the header's rule and a card's edge


# ------------------------------------------------------------------- the cluster: the real service


@pytest.mark.cluster
def test_each_user_reads_their_own_report_through_the_service(
    api_service: ApiService, short_root: Path, tmp_path: Path
) -> None:
    """The whole path as real users: the service (as root, its own database) answers ``hpcserve report``
    run by alice, bob and carol (an admin through @hpcadmin) with runuser; usage comes from sacct."""
    for user, name in (("alice", "alice-chat"), ("bob", "bob-coder")):
        served = api_service.run_as(user, "serve", "sim-model", "--name", name, "--engine", "simulator",
                                    "--min-replicas", "0", "--json")  # fmt: skip
        assert served.returncode == 0, served.stderr
    clock = [datetime.now(UTC)]
    with HistoryStore(api_service.db_url, clock=lambda: clock[0]) as store:
        populate(store, clock, deployments=False)
    pages, data = {}, {}
    for user in ("alice", "bob", "carol"):
        folder = short_root / user
        folder.mkdir()
        shutil.chown(folder, user)
        done = api_service.run_as(user, "report", "--since", "7d", "-o", str(folder / "week.html"))
        assert done.returncode == 0, done.stderr
        pages[user] = (folder / "week.html").read_text(encoding="utf-8")
        answer = api_service.run_as(user, "report", "--since", "7d", "--json")
        assert answer.returncode == 0, answer.stderr
        data[user] = json.loads(answer.stdout)
    names = {user: [d["name"] for d in data[user]["deployments"]] for user in data}
    assert names == {"alice": ["alice-chat"], "bob": ["bob-coder"], "carol": ["alice-chat", "bob-coder"]}
    assert "bob-coder" not in pages["alice"] and "bob-coder" not in json.dumps(data["alice"])
    assert "alice-chat" not in pages["bob"]
    kinds = {user: [b["kind"] for b in data[user]["busy"]] for user in data}
    assert kinds == {"alice": ["training"], "bob": ["inference"], "carol": ["training", "inference"]}
    assert [data[u]["everyone"] for u in ("alice", "bob", "carol")] == [False, False, True]
    admins = rd.from_json(data["carol"]).partitions
    for answer in data.values():  # sacct was read for each: a table (maybe empty), never "could not be read"
        assert answer["usage"] is not None, answer["usage_note"]
        # cluster facts, everyone's alike (each report began a moment after the last)
        partitions = rd.from_json(answer).partitions
        assert [p.name for p in partitions] == [p.name for p in admins] == ["train", "infer", "all"]
        assert [p.allocated_pct() for p in partitions] == pytest.approx(
            [p.allocated_pct() for p in admins], abs=0.5
        )
        assert (answer["evictions"], answer["lost_gpu_h"]) == (1, 1.5)
    shot, dom = screenshot_and_dom(pages["carol"], short_root)
    assert len(dom.svgs) >= 3 and all(children > 20 for children in dom.svgs) and dom.external == []
    assert colours(pixels(shot)) > 500
    shutil.copy(shot, tmp_path / "report-cluster.png")  # kept by pytest, to look at
