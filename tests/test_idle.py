"""The idle decision (hpcserve.telemetry.idle), pure: which running jobs are flagged, since when, and the
GPU-hours they wasted; and the policy section that drives it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from hpcserve.config import load_policy
from hpcserve.config.policy import IdleRules
from hpcserve.errors import ConfigError
from hpcserve.model.cluster import Job, JobState
from hpcserve.model.telemetry import GpuSample
from hpcserve.telemetry.idle import covered, flag_from_json, flag_to_json, idle_flags, job_kind, span

NOW = datetime(2026, 12, 7, 19, 0, tzinfo=UTC)
RULES = IdleRules(gpu_util_below_pct=20, window_s=1800, replica_no_requests_s=1800, sample_gap_s=120)
POLICY = Path(__file__).resolve().parent.parent / "policies" / "default.yaml"


def job(job_id: str, *, started_s_ago: float = 3600, gpus: int = 2, tag: str | None = None,
        state: JobState = JobState.RUNNING, user: str = "alice") -> Job:  # fmt: skip
    start = NOW - timedelta(seconds=started_s_ago)
    return Job(
        job_id, int(job_id), "j", user, "acct", "train", state, 1, ("node1",), gpus, start=start, tag=tag
    )


def readings(job_id: str, util: float, *, every_s: int = 60, span_s: int = 1800, gpus: int = 2,
             end_s_ago: int = 0) -> list[GpuSample]:  # fmt: skip
    out = []
    for t in range(end_s_ago, span_s + end_s_ago + 1, every_s):
        at = NOW - timedelta(seconds=t)
        out += [GpuSample(at, job_id, f"GPU-{i}", i, util, 1, 2, None, None) for i in range(gpus)]
    return out


def test_a_job_under_the_threshold_for_the_whole_window_is_flagged_with_its_waste() -> None:
    (flag,) = idle_flags({"10": readings("10", 5.0)}, [job("10")], {}, RULES, NOW)
    assert flag.job_id == "10" and flag.user == "alice" and flag.kind == "training" and flag.gpus == 2
    assert flag.reason == "GPUs averaged 5% for 30 min (< 20%)" and flag.mean_util_pct == 5.0
    assert flag.since == NOW - timedelta(seconds=1800)
    assert flag.gpu_hours_wasted == 1.0  # 2 GPUs x the 0.5 h window


def test_busy_job_is_not_flagged_and_the_mean_counts_every_gpu() -> None:
    assert idle_flags({"11": readings("11", 90.0)}, [job("11")], {}, RULES, NOW) == []
    # one GPU at 0 %, one at 50 %: the job's mean is 25 %, not under 20 %
    mixed = [s for s in readings("12", 0.0) if s.gpu_index == 0] + [
        s for s in readings("12", 50.0) if s.gpu_index == 1
    ]
    assert idle_flags({"12": mixed}, [job("12")], {}, RULES, NOW) == []


def test_no_flag_without_the_whole_window_running_and_sampled() -> None:
    young = job("13", started_s_ago=1000)  # started inside the window
    assert idle_flags({"13": readings("13", 1.0, span_s=1000)}, [young], {}, RULES, NOW) == []
    late = readings("14", 1.0, span_s=1500)  # readings began 5 min into the window
    assert idle_flags({"14": late}, [job("14")], {}, RULES, NOW) == []
    stale = readings("15", 1.0, span_s=1500, end_s_ago=300)  # the last reading is 5 min old
    assert idle_flags({"15": stale}, [job("15")], {}, RULES, NOW) == []
    holey = [s for s in readings("16", 1.0) if not 600 <= (NOW - s.at).total_seconds() <= 900]
    assert idle_flags({"16": holey}, [job("16")], {}, RULES, NOW) == []
    assert idle_flags({}, [job("17")], {}, RULES, NOW) == []  # no telemetry is no proof
    pending = job("18", state=JobState.PENDING)
    assert idle_flags({"18": readings("18", 1.0)}, [pending], {}, RULES, NOW) == []


def test_readings_outside_the_window_do_not_count() -> None:
    busy_before = readings("19", 100.0, span_s=3000, end_s_ago=1860) + readings("19", 3.0)
    (flag,) = idle_flags({"19": busy_before}, [job("19", started_s_ago=7200)], {}, RULES, NOW)
    assert flag.mean_util_pct == 3.0


def test_a_flag_keeps_the_since_of_the_last_tick() -> None:
    earlier = NOW - timedelta(hours=2)
    (flag,) = idle_flags({"20": readings("20", 5.0)}, [job("20", started_s_ago=9000)], {}, RULES, NOW,
                         previous={"20": earlier})  # fmt: skip
    assert flag.since == earlier and flag.gpu_hours_wasted == 4.0  # 2 GPUs x 2 h


def test_a_replica_serving_nothing_is_flagged_from_its_last_request() -> None:
    replica = job("30", started_s_ago=7200, gpus=1, tag="hpcserve:replica:llama:0")
    last = NOW - timedelta(seconds=2700)
    (flag,) = idle_flags({}, [replica], {"30": last}, RULES, NOW)
    assert flag.kind == "inference" and flag.since == last and flag.mean_util_pct is None
    assert (
        flag.reason == "served no request for 45 min (since its last one)" and flag.gpu_hours_wasted == 0.75
    )
    never = idle_flags({}, [replica], {"30": None}, RULES, NOW)[0]
    assert never.since == replica.start and "since it started" in never.reason and never.gpu_hours_wasted == 2
    recent = {"30": NOW - timedelta(seconds=600)}
    assert idle_flags({}, [replica], recent, RULES, NOW) == []
    off = RULES.model_copy(update={"replica_no_requests_s": None})
    assert idle_flags({}, [replica], {"30": None}, off, NOW) == []


def test_a_replica_idle_both_ways_gets_one_flag_with_both_reasons() -> None:
    replica = job("31", started_s_ago=7200, tag="hpcserve:replica:llama:1")
    (flag,) = idle_flags({"31": readings("31", 5.0)}, [replica], {"31": None}, RULES, NOW)
    assert flag.since == replica.start and flag.reason.count("; ") == 1 and flag.mean_util_pct == 5.0


def test_flags_come_most_wasteful_first() -> None:
    jobs = [job("40", gpus=1), job("41", gpus=4)]
    samples = {"40": readings("40", 1.0, gpus=1), "41": readings("41", 1.0, gpus=4)}
    assert [f.job_id for f in idle_flags(samples, jobs, {}, RULES, NOW)] == ["41", "40"]


def test_helpers() -> None:
    assert job_kind(job("1", tag="hpcserve:inference:x")) == "inference"
    assert job_kind(job("1", tag="hpcserve:train:x")) == job_kind(job("1")) == "training"
    assert [span(45), span(1800), span(9000)] == ["45 s", "30 min", "2.5 h"]
    assert covered([NOW], NOW - timedelta(seconds=10), NOW, 10) and not covered([], NOW, NOW, 10)
    (flag,) = idle_flags({"10": readings("10", 5.0)}, [job("10")], {}, RULES, NOW)
    assert flag_from_json(flag_to_json(flag)) == flag


def test_policy_idle_section_loads_and_refuses_unknown_keys(tmp_path: Path) -> None:
    assert load_policy(POLICY).idle == IdleRules()
    data = yaml.safe_load(POLICY.read_text())
    data["idle"] = {"window_s": 20, "action": {"inference": "scale_down"}}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    idle = load_policy(path).idle
    assert idle.window_s == 20 and idle.action.inference == "scale_down" and idle.action.training == "notify"
    for bad in ({"window": 20}, {"action": {"training": "scale_down"}}, {"gpu_util_below_pct": 0}):
        data["idle"] = bad
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError, match="idle"):
            load_policy(path)
