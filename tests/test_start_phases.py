"""A replica start's phases: their JSON, the announcement's check of them, and how people see them."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hpcserve.api.context import ApiContext
from hpcserve.api.replicas import announce, parse_announce
from hpcserve.config import load_policy, load_site_config
from hpcserve.errors import ValidationError
from hpcserve.model.cluster import Job, JobState
from hpcserve.service.metrics import ServiceMetrics
from hpcserve.serving.engine_proc import free_port
from hpcserve.serving.phases import STAGING_KINDS, Staging, StartPhases
from hpcserve.serving.start_probe import first_token_s, measure_start
from hpcserve.serving.tags import secret_hash
from hpcserve.slurm.shared_view import SharedView
from hpcserve.store import HistoryStore, Replica
from tests.conftest import POLICY, SITE

FULL = StartPhases(staging=Staging("copied", 2.5, 3 << 30, 3 << 30), engine_load_s=20.25,
                   first_healthy_s=0.5, first_token_s=0.125, queue_wait_s=4.0, job_start=1.7e9)  # fmt: skip
BODY = {"deployment": "tiny", "index": 0, "job_id": "42", "host": "node5", "port": 8000}


def test_phases_round_trip_through_json() -> None:
    data = FULL.as_json()
    assert data == {"staging": {"kind": "copied", "seconds": 2.5, "bytes": 3 << 30, "hashed_bytes": 3 << 30},
                    "engine_load_s": 20.25, "first_healthy_s": 0.5, "first_token_s": 0.125,
                    "queue_wait_s": 4.0, "job_start": 1.7e9}  # fmt: skip
    assert StartPhases.from_json(data) == FULL
    assert StartPhases.from_json({}) == StartPhases()
    assert "engine_load_s" not in StartPhases().as_json()  # unmeasured phases are left out


def test_every_phase_is_listed_in_order() -> None:
    assert list(FULL.seconds()) == ["queue_wait", "staging", "engine_load", "first_healthy", "first_token"]
    assert list(StartPhases().seconds()) == ["staging"]


def test_queue_wait_from_the_submit_time() -> None:
    phases = StartPhases(job_start=1000.0)
    assert phases.with_queue_wait(990.5).queue_wait_s == 9.5
    assert phases.with_queue_wait(1010.0).queue_wait_s == 0.0  # clocks a little apart: never negative
    assert FULL.with_queue_wait(0.0).queue_wait_s == 4.0  # the replica's own figure stands
    assert StartPhases().with_queue_wait(0.0).queue_wait_s is None


def test_stagings_one_after_the_other_add_up_and_keep_the_kind_that_did_most() -> None:
    valid, copied = Staging("warm-valid", 0.5, 0, 0), Staging("copied", 2.0, 10, 10)
    assert valid.plus(copied) == copied.plus(valid) == Staging("copied", 2.5, 10, 10)
    assert Staging().plus(valid) == valid and Staging("hashed", 1.0, 0, 7).plus(valid).kind == "hashed"
    assert FULL.with_staging(valid).staging == Staging("copied", 3.0, 3 << 30, 3 << 30)


def test_summary_for_people() -> None:
    assert FULL.summary() == ("queue 4.0s, staging copied 2.5s (3.0 GiB), engine load 20.2s, healthy 0.500s, "
                              "first token 0.125s")  # fmt: skip
    assert StartPhases(Staging("warm-valid", 0.0021)).summary() == "staging warm-valid 0.002s"


@pytest.mark.parametrize(
    ("phases", "field"),
    [
        pytest.param([], "phases", id="not-an-object"),
        pytest.param({"engine_load": 1}, "phases", id="unknown-key"),
        pytest.param({"engine_load_s": "1"}, "phases.engine_load_s", id="text"),
        pytest.param({"engine_load_s": True}, "phases.engine_load_s", id="bool"),
        pytest.param({"first_token_s": -1}, "phases.first_token_s", id="negative"),
        pytest.param({"queue_wait_s": 1e12}, "phases.queue_wait_s", id="too-long"),
        pytest.param({"first_healthy_s": math.inf}, "phases.first_healthy_s", id="infinite"),
        pytest.param({"job_start": 1e13}, "phases.job_start", id="far-future"),
        pytest.param({"staging": {"kind": "cached"}}, "phases.staging.kind", id="unknown-kind"),
        pytest.param({"staging": {"kind": "copied", "bytes": 1.5}}, "phases.staging.bytes", id="bytes"),
        pytest.param({"staging": {"kind": "none", "extra": 1}}, "phases.staging", id="staging-key"),
        pytest.param({"staging": "copied"}, "phases.staging", id="staging-text"),
    ],
)
def test_bad_phases_are_refused_naming_the_field(phases: Any, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_announce({**BODY, "phases": phases})
    message = str(info.value)
    assert message.startswith(f"{field}:") and "\n" not in message


def test_the_announcement_carries_its_phases() -> None:
    assert parse_announce(BODY).phases is None
    note = parse_announce({**BODY, "phases": FULL.as_json()})
    assert note.phases == FULL
    for kind in STAGING_KINDS:
        assert parse_announce({**BODY, "phases": {"staging": {"kind": kind}}}).phases is not None


def test_the_announced_phases_are_stored_with_the_queue_wait(tmp_path: Path) -> None:
    store = HistoryStore(f"sqlite:///{tmp_path / 'h.db'}")
    store.upgrade()
    store.create_deployment("tiny", "alice", {"name": "tiny", "model": "m"}, 1)
    submitted = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    store.upsert_replica("tiny", 0, job_id="42", state="starting", started_at=submitted,
                         secret_hash=secret_hash("s3cret"))  # fmt: skip
    api = ApiContext(load_site_config(SITE), load_policy(POLICY), store, None)  # type: ignore[arg-type]
    phases = StartPhases(Staging("warm-valid", 0.01), 1.0, 0.2, 0.05, job_start=submitted.timestamp() + 7.5)
    note = parse_announce({**BODY, "phases": phases.as_json()})
    stored = announce(api, note, "s3cret", None).phases
    assert stored is not None and StartPhases.from_json(stored).queue_wait_s == 7.5
    assert StartPhases.from_json(stored).staging.kind == "warm-valid"
    assert announce(api, parse_announce(BODY), "s3cret", None).phases is None  # no stale phases


class OneJob:
    """Slurm's answer for the service's shared read: the replica's job, queued 12 s by slurmctld's clock."""

    def __init__(self, state: JobState = JobState.RUNNING) -> None:
        self.state, self.reads = state, 0

    def jobs(self, filt: object = None) -> list[Job]:
        self.reads += 1
        submit = datetime(2026, 12, 7, 11, 0, tzinfo=UTC)
        start = submit + timedelta(seconds=12) if self.state is JobState.RUNNING else None
        return [Job("42", 42, "tiny-0", "alice", "acct", "infer", self.state, 1, ("node5",), submit=submit,
                    start=start, wait_s=12.0 if start else 30.0)]  # fmt: skip


@pytest.mark.parametrize("state", [JobState.RUNNING, JobState.PENDING])
def test_the_queue_wait_is_slurms_own_where_the_clocks_disagree(tmp_path: Path, state: JobState) -> None:
    store = HistoryStore(f"sqlite:///{tmp_path / 'h.db'}")
    store.upgrade()
    store.create_deployment("tiny", "alice", {"name": "tiny", "model": "m"}, 1)
    submitted = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)  # the service's clock: an hour off slurmctld's
    store.upsert_replica("tiny", 0, job_id="42", state="starting", started_at=submitted,
                         secret_hash=secret_hash("s3cret"))  # fmt: skip
    live = OneJob(state)
    shared = SharedView(live, 2.0)
    api = ApiContext(load_site_config(SITE), load_policy(POLICY), store, shared)
    phases = StartPhases(Staging("none"), job_start=submitted.timestamp() + 7.5)  # the node's clock
    note = parse_announce({**BODY, "phases": phases.as_json()})
    assert StartPhases.from_json(announce(api, note, "s3cret", None).phases).queue_wait_s == 7.5
    assert live.reads == 0  # no read of its own: without a recent one, the two clocks' figure
    shared.jobs()  # the service's tick
    stored = announce(api, note, "s3cret", None).phases
    assert live.reads == 1
    expected = 12.0 if state is JobState.RUNNING else 7.5  # the clocks disagree; pending: no start yet
    assert StartPhases.from_json(stored).queue_wait_s == expected
    agreeing = StartPhases(Staging("none"), job_start=submitted.timestamp() + 11.4)  # within Slurm's 1 s
    stored = announce(api, parse_announce({**BODY, "phases": agreeing.as_json()}), "s3cret", None).phases
    assert StartPhases.from_json(stored).queue_wait_s == pytest.approx(11.4)  # the finer figure stands


def test_the_engine_phases_are_measured_on_the_engine_simulator() -> None:
    """The engine simulator (not vLLM) with a startup delay and an engine key: load, listing, first token."""
    port = free_port()
    argv = [sys.executable, "-m", "hpcserve", "engine-sim", "m", "--served-model-name", "llm", "--host",
            "127.0.0.1", "--port", str(port), "--startup-delay", "0.6"]  # fmt: skip
    proc = subprocess.Popen(argv, env={**os.environ, "VLLM_API_KEY": "k3y"})
    try:
        base = StartPhases(Staging("none"), job_start=123.0)
        phases = measure_start(f"http://127.0.0.1:{port}", proc, 60, "llm", "k3y", base)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert phases.engine_load_s is not None and phases.engine_load_s >= 0.6
    assert phases.first_healthy_s is not None and phases.first_token_s is not None
    assert (phases.staging, phases.job_start) == (Staging("none"), 123.0)
    assert list(phases.seconds()) == ["staging", "engine_load", "first_healthy", "first_token"]
    assert first_token_s(f"http://127.0.0.1:{port}", "llm", "k3y", timeout_s=1) is None  # gone: unmeasured


def test_the_service_metrics_show_each_live_replicas_phases() -> None:
    metrics = ServiceMetrics()
    now = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)

    def replica(index: int, state: str, phases: Any) -> Replica:
        return Replica("tiny", index, 1, str(40 + index), state, None, "node5", 8000, now, now, now,
                       phases=phases)  # fmt: skip

    metrics.watched.engines = (replica(0, "ready", FULL.as_json()), replica(1, "starting", None),
                               replica(2, "ready", {"staging": "bad"}),
                               replica(3, "dead", FULL.as_json()))  # fmt: skip
    text = generate_latest(metrics.registry).decode()
    got = {(s.name, s.labels.get("phase") or s.labels["what"], s.labels["replica"],
            s.labels["staging"]): s.value
           for family in text_string_to_metric_families(text) for s in family.samples
           if s.name.startswith("hpcserve_replica_st")}  # fmt: skip
    phase = "hpcserve_replica_start_phase_seconds"
    assert got == {(phase, "queue_wait", "0", "copied"): 4.0, (phase, "staging", "0", "copied"): 2.5,
                   (phase, "engine_load", "0", "copied"): 20.25, (phase, "first_healthy", "0", "copied"): 0.5,
                   (phase, "first_token", "0", "copied"): 0.125,
                   ("hpcserve_replica_staged_bytes", "copied", "0", "copied"): 3 << 30,
                   ("hpcserve_replica_staged_bytes", "hashed", "0", "copied"): 3 << 30}  # fmt: skip
