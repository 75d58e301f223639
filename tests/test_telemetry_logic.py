"""The telemetry's pure parts and the reporter's loop, without NVML or a service: CUDA_VISIBLE_DEVICES
mapping, report bodies, back-off, the recording format, and the reporter driven by a fake sampler and
transport."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from submitit.helpers import DelayedSubmission

from hpcserve.errors import ValidationError
from hpcserve.model.telemetry import GpuSample
from hpcserve.telemetry.batching import (
    MAX_RETRY_DELAY_S,
    MAX_SAMPLES_PER_CALL,
    Outcome,
    ReplicaIdentity,
    keep_newest,
    outcome_of,
    report_bodies,
    report_headers,
    retry_delay_s,
)
from hpcserve.telemetry.devices import VisibleDevice, job_sees_gpus, visible_devices
from hpcserve.telemetry.injob import WithTelemetry, wanted
from hpcserve.telemetry.nvml import NvmlUnavailable
from hpcserve.telemetry.recorded import RecordedDevice, RecordedRow, Recording, parse, render
from hpcserve.telemetry.reporter import Answer, Reporter, enabled, interval_from_env
from tests.nvml_fixtures import MIXED

UUIDS = ["GPU-aaaa-1", "GPU-bbbb-2", "GPU-bbbc-3", "GPU-cccc-4"]
T0 = datetime(2026, 12, 7, 18, 0, tzinfo=UTC)


# ------------------------------------------------------------------------------------- CUDA_VISIBLE_DEVICES
def test_unset_means_every_device_in_nvml_order() -> None:
    assert visible_devices(None, UUIDS).devices == tuple(VisibleDevice(i, i, u) for i, u in enumerate(UUIDS))


@pytest.mark.parametrize("value", ["", " ", "NoDevFiles"])
def test_empty_or_slurms_nodevfiles_means_none(value: str) -> None:
    assert visible_devices(value, UUIDS).devices == ()


def test_indices_and_uuids_keep_the_listed_order() -> None:
    seen = visible_devices("3, GPU-aaaa-1,1", UUIDS)
    assert seen.devices == (
        VisibleDevice(0, 3, UUIDS[3]),
        VisibleDevice(1, 0, UUIDS[0]),
        VisibleDevice(2, 1, UUIDS[1]),
    )
    assert seen.stopped_at is None


def test_a_unique_uuid_prefix_is_enough_and_an_ambiguous_one_stops() -> None:
    assert visible_devices("GPU-bbbc", UUIDS).devices == (VisibleDevice(0, 2, UUIDS[2]),)
    stopped = visible_devices("0,GPU-bbb,3", UUIDS)
    assert stopped.devices == (VisibleDevice(0, 0, UUIDS[0]),) and stopped.stopped_at == "GPU-bbb"


STOPS = [("1,7,2", "7"), ("1,1,2", "1"), ("2,GPU-zz,0", "GPU-zz"), ("0,cuda:1", "cuda:1"), ("0,-1", "-1"),
         ("1,GPU-", "GPU-")]  # fmt: skip


@pytest.mark.parametrize(("value", "stop"), STOPS)
def test_cuda_stops_at_the_first_entry_it_cannot_use(value: str, stop: str) -> None:
    seen = visible_devices(value, UUIDS)
    assert seen.stopped_at == stop
    assert [d.nvml_index for d in seen.devices] == [int(value.split(",")[0])]


def test_mig_uuids_go_to_nvml_by_uuid() -> None:
    seen = visible_devices("MIG-1234-abcd,0", UUIDS)
    assert seen.devices == (VisibleDevice(0, None, "MIG-1234-abcd"), VisibleDevice(1, 0, UUIDS[0]))


@pytest.mark.parametrize(("environ", "sees"), [
    ({}, True),  # not a job: an admin's look at the node
    ({"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "0,1"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "2"}, True),
    ({"SLURM_JOB_ID": "7"}, False),  # a CPU job on a GPU node: the node's GPUs are other jobs'
    ({"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "0"}, False),
])  # fmt: skip
def test_only_a_job_given_gpus_samples(environ: dict[str, str], sees: bool) -> None:
    assert job_sees_gpus(environ) is sees


# ------------------------------------------------------------------------------------- bodies and back-off
def sample(i: int, at: datetime = T0, power: float | None = 250.0) -> GpuSample:
    return GpuSample(at + timedelta(seconds=i), "42", UUIDS[i % 4], i % 4, 37.0, 1, 2, power, 1410)


def test_a_body_follows_the_contract() -> None:
    (body,) = report_bodies("42", [sample(0, power=None)])
    assert body == {"job_id": "42", "samples": [{"at": "2026-12-07T18:00:00+00:00", "gpu_uuid": UUIDS[0],
                    "gpu_index": 0, "util_pct": 37.0, "mem_used_bytes": 1, "mem_total_bytes": 2,
                    "power_w": None, "sm_clock_mhz": 1410}]}  # fmt: skip
    (replica,) = report_bodies("42", [sample(0)], ReplicaIdentity("chat", 1, "s3cret"))
    assert (replica["deployment"], replica["index"]) == ("chat", 1)
    assert report_headers(ReplicaIdentity("chat", 1, "s3cret")) == {"Authorization": "Replica s3cret"}
    assert report_headers(None) == {}
    assert "s3cret" not in repr(ReplicaIdentity("chat", 1, "s3cret"))


def test_bodies_carry_at_most_256_samples_in_order() -> None:
    samples = [sample(i) for i in range(2 * MAX_SAMPLES_PER_CALL + 3)]
    bodies = report_bodies("42", samples)
    assert [len(b["samples"]) for b in bodies] == [256, 256, 3]
    sent = [s["at"] for b in bodies for s in b["samples"]]
    assert sent == [s.at.isoformat() for s in samples]
    assert report_bodies("42", []) == []


ANSWERS = [(200, Outcome.SENT), (204, Outcome.SENT), (None, Outcome.RETRY), (500, Outcome.RETRY),
           (503, Outcome.RETRY), (429, Outcome.RETRY), (408, Outcome.RETRY), (400, Outcome.REFUSED),
           (403, Outcome.REFUSED), (404, Outcome.REFUSED)]  # fmt: skip


@pytest.mark.parametrize(("status", "outcome"), ANSWERS)
def test_outcome_of_an_answer(status: int | None, outcome: Outcome) -> None:
    assert outcome_of(status) is outcome


def test_back_off_doubles_up_to_the_cap() -> None:
    assert [retry_delay_s(15, n) for n in (1, 2, 3, 4, 5)] == [30, 60, 120, 240, MAX_RETRY_DELAY_S]
    assert retry_delay_s(15, 10_000) == MAX_RETRY_DELAY_S and retry_delay_s(0.001, 1) == 2.0


def test_the_buffer_keeps_the_newest() -> None:
    samples = [sample(i) for i in range(10)]
    assert keep_newest(samples, 3) == samples[-3:] and keep_newest(samples, 0) == []


def test_opt_out_and_interval_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert enabled({}) and enabled({"HPCSERVE_TELEMETRY": "1"})
    assert not any(enabled({"HPCSERVE_TELEMETRY": v}) for v in ("0", "false", "OFF", " no "))
    assert wanted({}) and not wanted({"HPCSERVE_TELEMETRY": "0"})
    monkeypatch.setenv("HPCSERVE_TELEMETRY", "0")
    assert not wanted({}) and wanted({"HPCSERVE_TELEMETRY": "1"})  # the job's env wins over the submitter's
    for value, want in (("1", 1.0), ("0.5", 0.5), ("x", 15.0), ("-3", 15.0)):
        monkeypatch.setenv("HPCSERVE_TELEMETRY_INTERVAL_S", value)
        assert interval_from_env() == want


# ------------------------------------------------------------------------------------- the reporter's loop
class FakeSampler:
    """Four GPUs a round; ``unavailable``: no NVML here."""

    def __init__(self, unavailable: bool = False) -> None:
        self.rounds, self.unavailable, self.closed = 0, unavailable, False

    def open(self) -> FakeSampler:
        if self.unavailable:
            raise NvmlUnavailable("NVML is not available here: Driver Not Loaded")
        return self

    def sample(self) -> list[GpuSample]:
        self.rounds += 1
        return [sample(4 * self.rounds + i) for i in range(4)]

    def close(self) -> None:
        self.closed = True


class FakeService:
    """Answers each post with the next status (the last one repeats) and keeps what it took."""

    def __init__(self, *statuses: int | None) -> None:
        self.statuses, self.calls = list(statuses), 0
        self.stored: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []

    def __call__(self, body: dict[str, Any], headers: dict[str, str]) -> Answer:
        status = self.statuses[min(self.calls, len(self.statuses) - 1)]
        self.calls += 1
        self.headers.append(headers)
        if status == 200:
            self.stored.extend(body["samples"])
        return status, "" if status == 200 else f"HTTP {status}"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_each_round_is_reported_in_order() -> None:
    service = FakeService(200)
    reporter = Reporter("42", FakeSampler(), service, interval_s=1, replica=ReplicaIdentity("chat", 0, "k"))
    for _ in range(3):
        reporter.tick()
    assert service.calls == 3 and reporter.sent == 12 and reporter.buffer == []
    assert [s["gpu_index"] for s in service.stored] == [0, 1, 2, 3] * 3
    assert service.headers[0] == {"Authorization": "Replica k"}


def test_a_failed_report_keeps_the_samples_backs_off_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    service, clock = FakeService(None, None, 200), Clock()
    reporter = Reporter("42", FakeSampler(), service, interval_s=15, monotonic=clock)
    with caplog.at_level(logging.INFO, logger="hpcserve.telemetry"):
        reporter.tick()  # fails: retry in 30 s
        clock.now = 15
        reporter.tick()  # not due: sampled only
        assert (service.calls, len(reporter.buffer)) == (1, 8)
        clock.now = 30
        reporter.tick()  # fails again: retry in 60 s
        clock.now = 95
        reporter.tick()  # gets through with everything kept
    assert service.calls == 3 and len(service.stored) == 16 and reporter.buffer == []
    lines = [r.getMessage() for r in caplog.records]
    assert len([line for line in lines if "cannot report" in line]) == 1
    assert lines[-1] == "telemetry: reporting again after 2 failed tries"


def test_a_refusal_stops_reporting_with_one_line(caplog: pytest.LogCaptureFixture) -> None:
    service = FakeService(403)
    reporter = Reporter("42", FakeSampler(), service, interval_s=0.01)
    with caplog.at_level(logging.INFO, logger="hpcserve.telemetry"):
        reporter.run()  # returns by itself: nothing more to do
    assert reporter.refused and service.calls == 1 and reporter.sampler.closed  # type: ignore[attr-defined]
    assert [r.getMessage() for r in caplog.records] == [
        "telemetry: the service refused this job's samples (HTTP 403): reporting stops"
    ]


def test_a_transport_that_raises_is_a_failed_report_not_a_failed_job() -> None:
    def broken(body: dict[str, Any], headers: dict[str, str]) -> Answer:
        raise OSError("connection reset")

    reporter = Reporter("42", FakeSampler(), broken, interval_s=1)
    reporter.tick()
    assert reporter.failures == 1 and len(reporter.buffer) == 4


def test_no_nvml_is_one_info_line_and_the_reporter_ends(caplog: pytest.LogCaptureFixture) -> None:
    service = FakeService(200)
    with caplog.at_level(logging.INFO, logger="hpcserve.telemetry"):
        Reporter("42", FakeSampler(unavailable=True), service).start().stop(timeout=5)
    assert service.calls == 0
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "Driver Not Loaded" in caplog.records[0].getMessage()


def test_a_sampler_that_fails_to_start_is_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(FakeSampler):
        def open(self) -> FakeSampler:
            raise RuntimeError("the GPU is lost")

    with caplog.at_level(logging.INFO, logger="hpcserve.telemetry"):
        Reporter("42", Broken(), FakeService(200)).run()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            "telemetry: cannot start the NVML sampler (RuntimeError: the GPU is lost): no GPU samples",
        )
    ]


def test_stop_sends_a_last_round() -> None:
    service = FakeService(200)
    reporter = Reporter("42", FakeSampler(), service, interval_s=60).start()
    reporter.stop(timeout=5)
    assert service.calls == 2 and len(service.stored) == 8  # the first round at start, the last at stop


# ------------------------------------------------------------------------------------- callables' wrapper
def add(a: int, b: int) -> int:
    return a + b


class Resumable:
    def __call__(self, x: int) -> int:
        return x

    def checkpoint(self, x: int) -> DelayedSubmission:
        return DelayedSubmission(Resumable(), x + 1)


def test_with_telemetry_calls_through_and_keeps_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCSERVE_TELEMETRY", "0")  # no reporter here: this is about the wrapping
    assert WithTelemetry(add)(1, b=2) == 3
    assert not hasattr(WithTelemetry(add), "checkpoint")
    again = WithTelemetry(Resumable()).checkpoint(1)
    assert isinstance(again.function, WithTelemetry) and again.args == (2,)


# ------------------------------------------------------------------------------------- recordings
def test_a_recording_reads_back_what_was_written() -> None:
    devices = (RecordedDevice("GPU-a", 80, "H100 80GB"), RecordedDevice("MIG-b", 10, "H100 MIG 1g", mig=True))
    rows = (RecordedRow(0.0, "GPU-a", 5, 1, None, 1410), RecordedRow(1.5, "MIG-b", None, 2, 3, None))
    recording = Recording("synthetic: a test", "550.1", devices, rows)
    assert parse(render(recording)) == recording


def test_the_shipped_recordings_parse_and_say_they_are_synthetic() -> None:
    mixed = parse(MIXED.read_text())
    assert mixed.source.startswith("synthetic") and len(mixed.devices) == 5 and len(mixed.rows) == 100


@pytest.mark.parametrize(("text", "problem"), [
    ("sample 0 GPU-x 1 2 3 4\n", "line 1: sample of 'GPU-x' before its device line"),
    ("device GPU-x 1 n\nsample 0 GPU-x 1 2 3\n", "line 2: a sample has 6 fields, this one 5"),
    ("device GPU-x lots n\n", "line 1: invalid literal"),
    ("gpu GPU-x\n", "line 1: unknown record 'gpu'"),
])  # fmt: skip
def test_a_bad_recording_names_its_line(text: str, problem: str) -> None:
    with pytest.raises(ValidationError, match="rec.txt: " + problem):
        parse(text, "rec.txt")
