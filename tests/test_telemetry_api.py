"""The telemetry API's pure parts: a report body checked field by field (one line naming the field), the
flags' staleness, and ps's stdlib client's parsing. The service side, as real users, is in
test_telemetry_cluster.py."""

from __future__ import annotations

import dataclasses
import json
import socketserver
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from hpcserve.api.caller import Caller
from hpcserve.api.context import ApiContext
from hpcserve.api.errors import Forbidden
from hpcserve.api.job_owners import JobOwners
from hpcserve.api.telemetry import (
    FLAGS_STATE,
    MAX_SAMPLES,
    admin_idle_jobs,
    current_flags,
    idle_jobs,
    latest_by_job,
    parse_report,
    store_report,
)
from hpcserve.cli import ps_telemetry
from hpcserve.config.sections import ServiceSettings
from hpcserve.errors import ValidationError
from hpcserve.model.cluster import Job, JobState
from hpcserve.model.telemetry import IdleFlag
from hpcserve.serving.tags import secret_hash
from hpcserve.slurm.shared_view import SharedView
from hpcserve.store import HistoryStore
from hpcserve.telemetry.idle import flag_to_json

NOW = datetime(2026, 12, 7, 19, 0, tzinfo=UTC)
SAMPLE = {"at": "2026-12-07T18:59:50+00:00", "gpu_uuid": "GPU-1", "gpu_index": 0, "util_pct": 37.0,
          "mem_used_bytes": 1, "mem_total_bytes": 85899345920, "power_w": 250.0,
          "sm_clock_mhz": 1410}  # fmt: skip


def body(**changes: Any) -> dict[str, Any]:
    sample = {**SAMPLE, **changes.pop("sample", {})}
    return {"job_id": "123", "samples": [sample], **changes}


def test_a_good_body_parses_to_samples_of_the_job() -> None:
    report = parse_report(body(deployment="llama", index=0), NOW)
    (sample,) = report.samples
    assert (report.job_id, report.deployment, report.index) == ("123", "llama", 0)
    assert sample.job_id == "123" and sample.at == datetime(2026, 12, 7, 18, 59, 50, tzinfo=UTC)
    assert sample.mem_total_bytes == 85899345920 and sample.power_w == 250.0 and sample.sm_clock_mhz == 1410
    bare = parse_report(body(sample={"power_w": None, "sm_clock_mhz": None, "util_pct": 5}), NOW)
    assert bare.samples[0].power_w is None and bare.samples[0].util_pct == 5.0 and bare.deployment is None


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"job_id": "12; rm"}, "job_id:"),
        ({"job_id": 123}, "job_id:"),
        ({"samples": []}, "samples:"),
        ({"samples": "x"}, "samples:"),
        ({"samples": [SAMPLE] * (MAX_SAMPLES + 1)}, "samples: expected a list of 1 to 256 readings, got 257"),
        ({"samples": [1]}, "samples[0]: expected a JSON object"),
        ({"sample": {"at": "2026-12-07T18:59:50"}}, "samples[0].at: expected an ISO 8601 time with its zone"),
        ({"sample": {"at": "yesterday"}}, "samples[0].at:"),
        ({"sample": {"at": "2026-12-07T20:00:00+00:00"}}, "samples[0].at: 2026-12-07T20:00:00+00:00 is"),
        ({"sample": {"util_pct": 101}}, "samples[0].util_pct: expected a number from 0 to 100"),
        ({"sample": {"util_pct": "37"}}, "samples[0].util_pct:"),
        ({"sample": {"util_pct": True}}, "samples[0].util_pct:"),
        ({"sample": {"gpu_index": -1}}, "samples[0].gpu_index:"),
        ({"sample": {"mem_used_bytes": 1.5}}, "samples[0].mem_used_bytes:"),
        ({"sample": {"power_w": -3}}, "samples[0].power_w:"),
        ({"sample": {"gpu_uuid": "x" * 97}}, "samples[0].gpu_uuid:"),
        ({"deployment": "llama"}, "deployment, index: a replica sends both"),
        ({"deployment": "", "index": 0}, "deployment:"),
        ({"deployment": "llama", "index": -1}, "index:"),
    ],
)
def test_a_bad_body_is_one_line_naming_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_report(body(**changes), NOW)
    message = str(caught.value)
    assert message.startswith(field) and "\n" not in message, message


def test_flags_older_than_a_quarter_hour_are_not_served() -> None:
    flag = IdleFlag("5", "alice", "training", "GPUs averaged 5% for 30 min (< 20%)", NOW, 1, 0.5, 5.0)
    state = {"evaluated_at": NOW.isoformat(), "flags": [flag_to_json(flag)]}
    assert current_flags(state, NOW + timedelta(minutes=14)) == [flag]
    assert current_flags(state, NOW + timedelta(minutes=16)) == []
    assert current_flags(None, NOW) == [] and current_flags({}, NOW) == []


def test_ps_reads_the_answer_and_marks_only_the_jobs_it_names() -> None:
    answer = {"jobs": [{"job_id": "5", "util_pct": 4.6, "idle": True}, {"job_id": "7", "util_pct": None}]}
    found = ps_telemetry.parse(answer)
    assert found == {"5": (4.6, True), "7": (None, False)}
    jobs = [Job(i, int(i), "j", "alice", "a", "p", JobState.RUNNING, 1) for i in ("5", "6")]
    marked = ps_telemetry.annotate(jobs, found)
    assert [(j.gpu_util_pct, j.idle) for j in marked] == [(4.6, True), (None, None)]
    assert ps_telemetry.annotate(jobs, {}) is jobs


def test_ps_skips_silently_without_a_service_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServiceSettings().socket == ps_telemetry.DEFAULT_SOCKET
    monkeypatch.setenv(ps_telemetry.SOCKET_ENV, "/nonexistent/api.sock")
    assert ps_telemetry.start() is None and ps_telemetry.fetched(None) == {}


# ---------------------------------------------- the API's rules over a real SQLite store (Slurm recorded)
class RecordedSlurm:
    """The running jobs a filtered squeue would print (a unit test's stand-in; the cluster test has
    Slurm)."""

    def __init__(self, jobs: list[Job]) -> None:
        self.running, self.asked = jobs, []  # type: ignore[var-annotated]

    def jobs(self, filt: Any = None) -> list[Job]:
        self.asked.append(filt)
        return [j for j in self.running if not filt or j.id in filt.job_ids]


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiContext]:
    from hpcserve.config import load_policy, load_site_config
    from tests.conftest import POLICY, SITE

    site = load_site_config(SITE).model_copy(update={"admins": ["@hpcadmin"]})
    jobs = [Job("77", 77, "j", "alice", "a", "infer", JobState.RUNNING, 1, tag="hpcserve:replica:llama:0"),
            Job("88", 88, "j", "bob", "a", "train", JobState.RUNNING, 1)]  # fmt: skip
    with HistoryStore(f"sqlite:///{tmp_path}/h.db") as store:
        store.upgrade()
        store.create_deployment("llama", "alice", {"name": "llama"}, 1, served_model_name="llama")
        store.upsert_replica("llama", 0, job_id="77", state="ready", secret_hash=secret_hash("s3cret"))
        yield ApiContext(site, load_policy(POLICY), store, RecordedSlurm(jobs), clock=lambda: NOW)  # type: ignore[arg-type]


ALICE = Caller(1001, "alice", frozenset({"alice"}))
BOB = Caller(1002, "bob", frozenset({"bob"}))
CAROL = Caller(1003, "carol", frozenset({"carol", "hpcadmin"}))


def test_the_owner_or_the_replica_stores_and_nobody_else(api: ApiContext) -> None:
    mine = parse_report(body(job_id="77"), NOW)
    assert store_report(api, mine, None, ALICE) == 1
    assert api.slurm.asked[-1].job_ids == ("77",) and api.slurm.asked[-1].states == ("RUNNING",)  # type: ignore[attr-defined]
    as_replica = parse_report(body(job_id="77", deployment="llama", index=0), NOW)
    assert store_report(api, as_replica, "s3cret", None) == 1  # TCP: the secret is the proof
    refused = [(mine, None, BOB, "not a running job of bob"),
               (mine, None, CAROL, "not a running job of carol"),
               (mine, None, None, "no identity"), (as_replica, "guess", ALICE, "wrong secret"),
               (as_replica, "s3cret", BOB, "not bob"), (as_replica, None, ALICE, "with its secret"),
               (parse_report(body(job_id="88", deployment="llama", index=0), NOW), "s3cret", None,
                "not the job of replica llama:0")]  # fmt: skip
    for report, secret, caller, why in refused:
        with pytest.raises(Forbidden, match=why):
            store_report(api, report, secret, caller)
    rows = api.store.gpu_samples(None)
    assert [(r.user, r.kind, r.deployment) for r in rows] == [("alice", "inference", None),
                                                              ("alice", "inference", "llama")]  # fmt: skip


def test_readers_see_their_own_and_admins_everything(api: ApiContext) -> None:
    store_report(api, parse_report(body(job_id="77", sample={"util_pct": 5.0}), NOW), None, ALICE)
    store_report(api, parse_report(body(job_id="88", sample={"util_pct": 90.0}), NOW), None, BOB)
    flag = IdleFlag("77", "alice", "inference", "GPUs averaged 5% for 30 min (< 20%)", NOW, 1, 0.5, 5.0)
    api.store.put_state(FLAGS_STATE, {"evaluated_at": NOW.isoformat(), "flags": [flag_to_json(flag)]})
    assert [(r["job_id"], r["util_pct"], r["idle"]) for r in latest_by_job(api, ALICE)] == [("77", 5.0, True)]
    assert [(r["job_id"], r["idle"]) for r in latest_by_job(api, BOB)] == [("88", False)]
    assert [r["job_id"] for r in latest_by_job(api, CAROL)] == ["77", "88"]
    assert idle_jobs(api, BOB) == [] and idle_jobs(api, ALICE) == [flag] == idle_jobs(api, CAROL)
    answer = admin_idle_jobs(api, CAROL)
    assert answer["gpu_hours_wasted"] == 0.5 and answer["warm"] == []
    warm = {"job_id": "99", "user": "bob", "deployment": "sleepy", "gpus": 1}  # engines asleep by design
    api.store.put_state(FLAGS_STATE, {"evaluated_at": NOW.isoformat(), "flags": [], "warm": [warm]})
    assert admin_idle_jobs(api, CAROL)["warm"] == [warm] and admin_idle_jobs(api, CAROL)["flags"] == []
    with pytest.raises(Forbidden, match="idle jobs are for admins; bob is not one"):
        admin_idle_jobs(api, BOB)


@pytest.mark.parametrize("chunked", [False, True])
def test_ps_fetches_the_figures_over_the_socket_with_llhttp(tmp_path: Path, chunked: bool) -> None:
    body = json.dumps({"jobs": [{"job_id": "7", "util_pct": 41.5, "idle": True}]}).encode()
    framing = (b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
               if chunked else b"Content-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
    asked: list[bytes] = []

    class Answer(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            asked.append(self.request.recv(4096))
            whole = b"HTTP/1.1 200 OK\r\n" + framing
            for i in range(0, len(whole), 7):  # in small pieces: the parser is fed as they come
                self.request.sendall(whole[i : i + 7])

    path = str(tmp_path / "api.sock")
    with socketserver.UnixStreamServer(path, Answer) as server:
        threading.Thread(target=server.handle_request, daemon=True).start()
        assert ps_telemetry.fetch(path) == {"7": (41.5, True)}
    assert asked[0].startswith(b"GET /v1/telemetry/jobs HTTP/1.1\r\n")


def test_reports_of_a_job_cost_one_squeue_then_none_until_the_check_is_old(api: ApiContext) -> None:
    clock = [0.0]
    owners = JobOwners(ttl_s=300, miss_s=10, clock=lambda: clock[0])
    api = dataclasses.replace(api, job_owners=owners)
    report = parse_report(body(job_id="77"), NOW)
    for _ in range(50):  # a training job reporting every 15 s for 12 minutes
        store_report(api, report, None, ALICE)
    assert owners.filtered_reads == 1 and len(api.slurm.asked) == 1  # type: ignore[attr-defined]
    with pytest.raises(Forbidden, match="not a running job of bob"):  # the cache never changes the owner
        store_report(api, report, None, BOB)
    clock[0] = 301.0  # older than the TTL: checked again, so a job that ended stops being believed
    api.slurm.running = []  # type: ignore[attr-defined]
    with pytest.raises(Forbidden, match="not a running job of alice"):
        store_report(api, report, None, ALICE)
    for _ in range(20):  # made-up or ended job ids: at most one read per job id per miss_s
        with pytest.raises(Forbidden):
            store_report(api, report, None, ALICE)
    assert owners.filtered_reads == 2


def test_with_the_services_shared_view_a_known_running_job_costs_no_read_of_its_own(api: ApiContext) -> None:
    recorded = api.slurm
    view = SharedView(recorded, max_age_s=2.0)
    view.jobs()  # the controller's tick: one unfiltered squeue
    api = dataclasses.replace(api, slurm=view, job_owners=JobOwners())
    for _ in range(10):
        store_report(api, parse_report(body(job_id="77"), NOW), None, ALICE)
        store_report(api, parse_report(body(job_id="88"), NOW), None, BOB)
    assert api.job_owners.filtered_reads == 0 and recorded.asked == [None]  # type: ignore[attr-defined]
    view.invalidate()  # a write: no recent read to look at, so a new job is asked about alone, once
    store_report(api, parse_report(body(job_id="88", sample={"util_pct": 1.0}), NOW), None, BOB)
    assert recorded.asked == [None]  # type: ignore[attr-defined]  # 88 was verified already
