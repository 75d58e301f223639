"""The telemetry API's pure parts: a report body checked field by field (one line naming the field), the
flags' staleness, and ps's stdlib client's parsing. The service side, as real users, is in
test_telemetry_cluster.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from hpcserve.api.telemetry import MAX_SAMPLES, current_flags, parse_report
from hpcserve.cli import ps_telemetry
from hpcserve.config.sections import ServiceSettings
from hpcserve.errors import ValidationError
from hpcserve.model.cluster import Job, JobState
from hpcserve.model.telemetry import IdleFlag
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
