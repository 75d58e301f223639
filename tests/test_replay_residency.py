"""The residency replay (hpcserve.replay.residency): hand-made arrivals whose answers are known (a cold
start, a wake, a pool's evictions, the replica agent's rules played in time, GPU-hours), determinism, the
trace split, and a slice of the shared Azure conversation trace through every policy."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hpcserve.enginesim.core import SimConfig, step_seconds
from hpcserve.enginesim.timing import sleep_seconds, wake_seconds
from hpcserve.errors import ValidationError
from hpcserve.replay.residency import POLICIES, Job, Policy, ResidencyReplay, replay, wake_start
from hpcserve.replay.residency_model import (
    GIB_8B,
    Request,
    ResidencySettings,
    Trace,
    read_trace,
    split_trace,
    zipf_weights,
)
from tests.conftest import TRACES

PER_MODEL, TIERS, POOLS, SUMMED = POLICIES  # SUMMED: the pool on its summed load alone
S = ResidencySettings()
PROMPT = 800  # 0.1 s of prefill at 8,000 tokens/s
PREFILL_S = PROMPT / S.prefill_tokens_per_s
STEP_S = S.decode_ms_per_token / 1000  # a lone sequence's decode step
CONV = TRACES / "azure_llm_2023_conv.csv"


def request(at: float, model: int = 0, output: int = 1) -> Request:
    return Request(at, model, PROMPT, output)


def ttfts(
    settings: ResidencySettings, policy: Policy, requests: list[Request], horizon: float
) -> list[float]:
    """Every request's TTFT, in arrival order (the replay's recorded list)."""
    run = ResidencyReplay(settings, policy)
    run.run(requests, horizon)
    return run.ttfts


# --- the modelled times -------------------------------------------------------------------------------


def test_the_cold_start_is_queue_plus_load_plus_init_within_the_issues_30_to_90_s() -> None:
    assert S.weights_gib == pytest.approx(14.9, abs=0.01)
    assert S.cold_start_s == pytest.approx(10 + GIB_8B / 2 + 15)
    big = dataclasses.replace(S, weights_gib=70e9 * 2 / (1 << 30))
    assert 30 <= S.cold_start_s <= 35 and 85 <= big.cold_start_s <= 95


def test_wake_and_sleep_come_from_the_simulators_timing_model() -> None:
    assert S.wake_s == wake_seconds(1, S.weights_gib) == pytest.approx(2.2, abs=0.01)
    assert S.sleep_s == sleep_seconds(1, S.weights_gib)


def test_k_awake_is_what_fits_in_gpu_memory() -> None:
    assert S.max_awake == 4  # 72 GiB / (14.9 + 3)
    assert dataclasses.replace(S, gpu_gib=24.0).max_awake == 1
    assert dataclasses.replace(S, gpu_gib=10.0).max_awake == 1  # at least one
    assert S.job_start_s(12, 4) == pytest.approx(S.queue_wait_s + 12 * S.load_s + 8 * S.sleep_s)


# --- hand-made arrivals -------------------------------------------------------------------------------


def test_a_request_after_a_long_idle_pays_the_cold_start_per_model_and_the_wake_with_tiers() -> None:
    # t=0 starts the job (cold); t=300: idle past warm_after_s (120) but not idle_to_zero_s (600)
    requests = [request(0.0), request(300.0)]
    cold, hot = ttfts(S, PER_MODEL, requests, 400.0)
    assert cold == pytest.approx(S.cold_start_s + PREFILL_S + STEP_S)
    assert hot == pytest.approx(PREFILL_S + STEP_S)
    _, warm = ttfts(S, TIERS, requests, 400.0)
    assert warm == pytest.approx(S.wake_s + PREFILL_S + STEP_S)
    # after idle_to_zero_s both policies start a new job: a cold start again
    late = [request(0.0), request(2000.0)]
    assert ttfts(S, PER_MODEL, late, 2100.0)[1] == pytest.approx(S.cold_start_s + PREFILL_S + STEP_S)
    assert ttfts(S, TIERS, late, 2100.0)[1] == pytest.approx(S.cold_start_s + PREFILL_S + STEP_S)


def test_warm_and_cold_requests_are_counted_apart() -> None:
    requests = [request(0.0), request(300.0), request(301.0)]
    result = replay(S, TIERS, requests, 400.0)
    assert (result.requests, result.cold_requests, result.warm_requests, result.wakes) == (3, 1, 2, 1)
    # the one at 301 s waits for the wake the one at 300 s started (it is warm too, one wake for both),
    # then for that one's prefill
    _, first, second = ttfts(S, TIERS, requests, 400.0)
    assert first == pytest.approx(S.wake_s + PREFILL_S + STEP_S)
    batch_of_two = step_seconds(SimConfig(model="m"), 2, 0)  # the first one still decodes
    assert second == pytest.approx(S.wake_s - 1 + 2 * PREFILL_S + batch_of_two)
    assert result.warm_ttft_p99 == pytest.approx(first)  # the nearest rank of two: the larger


def test_two_models_alternating_in_a_one_awake_pool_each_pay_a_sleep_and_a_wake() -> None:
    settings = dataclasses.replace(S, models=2, gpu_gib=24.0)  # K = 1
    assert settings.max_awake == 1
    start = settings.job_start_s(2, 1)
    requests = [request(0.0, 0), request(100.0, 1), request(120.0, 0), request(140.0, 1)]
    first, *rest = ttfts(settings, SUMMED, requests, 200.0)
    assert first == pytest.approx(start + PREFILL_S + STEP_S)
    swap = settings.sleep_s + settings.wake_s + PREFILL_S + STEP_S
    assert rest == pytest.approx([swap, swap, swap])
    result = replay(settings, SUMMED, requests, 200.0)
    assert (result.jobs_started, result.wakes, result.warm_requests) == (1, 3, 3)
    # with the awake floor two models in use at K = 1 keep two jobs: no swap once the second is ready
    floored = replay(settings, POOLS, requests, 200.0)
    assert (floored.jobs_started, floored.peak_jobs) == (2, 2)


# --- the replica agent's rules in time (agent_rules.next_moves, sleep_plan) -----------------------------

K3 = dataclasses.replace(S, models=4, gpu_gib=60.0)  # K = 3 of 4 models; the job starts 0, 1 and 2 awake
START = [request(0.0, 0), request(1.0, 1), request(2.0, 2)]  # all admitted once the job is ready (102 s)


def pool_run(requests: list[Request]) -> ResidencyReplay:
    """One pool job (the summed load: no awake floor) through ``requests``, to 300 s."""
    run = ResidencyReplay(K3, SUMMED)
    run.run(requests, 300.0)
    assert len(run.groups[0].jobs) == 1
    return run


def test_a_wake_into_a_free_slot_does_not_wait_for_a_concurrent_idle_sleep() -> None:
    assert K3.max_awake == 3 and K3.job_start_s(4, 3) == pytest.approx(102.4, abs=0.1)
    # model 2 idles from 102 s: asleep at the 230 s tick; model 1 (last used at 150 s) goes to sleep at
    # the 280 s tick and is asleep 2.6 s later; model 3 asks at 281 s: model 2's slot is free
    run = pool_run([*START, request(150.0, 0), request(150.0, 1), request(260.0, 0), request(281.0, 3)])
    assert run.ttfts[-1] == pytest.approx(K3.wake_s + PREFILL_S + STEP_S)  # no part of the sleep
    job = run.groups[0].jobs[0]
    assert job.sleeping[1] == pytest.approx((280.0 + K3.sleep_s, False))  # its sleep ran beside the wake
    assert sorted(job.awake) == [0, 3]


def test_with_no_free_slot_a_wake_waits_for_an_idle_sleep_under_way_and_nothing_else_sleeps() -> None:
    # as above, but model 2 is woken again at 260 s: at 281 s models 0 and 2 are awake and 1 is going to
    # sleep (until 282.6 s): model 3 takes its slot when that sleep ends
    run = pool_run([*START, request(150.0, 0), request(150.0, 1), request(260.0, 0), request(260.0, 2),
                    request(281.0, 3)])  # fmt: skip
    assert run.ttfts[-1] == pytest.approx(280.0 + K3.sleep_s - 281.0 + K3.wake_s + PREFILL_S + STEP_S)
    job = run.groups[0].jobs[0]
    assert sorted(job.awake) == [0, 2, 3] and job.sleeping[1][1]  # its slot taken by the wake


def test_with_no_free_slot_and_no_sleep_under_way_the_lru_engine_sleeps_then_the_model_wakes() -> None:
    # models 0 and 2 woken at 260 s, model 1 last used at 250 s: at 281 s every slot is awake
    run = pool_run([*START, request(250.0, 1), request(260.0, 0), request(260.0, 2), request(281.0, 3)])
    assert run.ttfts[-1] == pytest.approx(K3.sleep_s + K3.wake_s + PREFILL_S + STEP_S)
    job = run.groups[0].jobs[0]
    assert sorted(job.awake) == [0, 2, 3] and job.sleeping[1] == pytest.approx((281.0 + K3.sleep_s, True))


def test_waits_for_slots_go_first_come_first_served_and_a_model_going_to_sleep_waits_for_its_sleep() -> None:
    def fresh() -> Job:
        job = Job(0, 0.0, K3, (0, 1, 2, 3), (0, 1, 2))  # 0, 1, 2 awake from 102.4 s
        job.last_used.update({0: 150.0, 1: 190.0, 2: 180.0})
        job.sleep(1, 200.0, K3.sleep_s, taken=False)  # an idle sleep, asleep at 202.6 s
        return job

    asleep_at = 200.0 + K3.sleep_s
    job = fresh()  # model 1 asks again while it goes to sleep: it waits for that sleep, then takes its slot
    assert wake_start(job, 1, 201.0, 3, K3.sleep_s) == pytest.approx(asleep_at)
    job = fresh()  # model 3 asks first and takes the slot of model 1's sleep ...
    assert wake_start(job, 3, 201.0, 3, K3.sleep_s) == pytest.approx(asleep_at)
    job.awake[3] = asleep_at + K3.wake_s
    # ... so model 1, asking next, needs another: model 0 (LRU) sleeps for it
    assert wake_start(job, 1, 201.5, 3, K3.sleep_s) == pytest.approx(201.5 + K3.sleep_s)
    assert 0 not in job.awake and job.sleeping[0] == pytest.approx((201.5 + K3.sleep_s, True))


def test_an_idle_sleep_follows_sleep_plan_and_never_sleeps_a_waking_model() -> None:
    run = ResidencyReplay(K3, SUMMED)
    job = Job(0, 0.0, K3, (0, 1, 2, 3), (0, 1))
    job.awake[3] = 205.0  # waking
    run._sleep(job, 3, 204.0)
    assert 3 in job.awake and 3 not in job.sleeping
    run._sleep(job, 0, 204.0)
    assert 0 not in job.awake and job.sleeping[0] == pytest.approx((204.0 + K3.sleep_s, False))


def test_a_pool_with_room_for_both_models_wakes_neither() -> None:
    settings = dataclasses.replace(S, models=2)  # K = 4
    requests = [request(0.0, 0), request(100.0, 1), request(120.0, 0), request(140.0, 1)]
    result = replay(settings, POOLS, requests, 200.0)
    assert (result.wakes, result.warm_requests, result.cold_requests) == (0, 0, 1)


def test_the_awake_floor_keeps_enough_pool_jobs_for_the_models_in_use() -> None:
    settings = dataclasses.replace(S, models=5)  # K = 4: five models in use need two jobs awake
    requests = [request(float(t), model) for t, model in enumerate(range(5))]
    assert replay(settings, SUMMED, requests, 300.0).peak_jobs == 1  # summed load: one job does
    floored = replay(settings, POOLS, requests, 300.0)
    assert (floored.peak_jobs, floored.jobs_started) == (2, 2)


def test_gpu_hours_run_from_the_allocation_to_the_scale_to_zero() -> None:
    result = replay(S, PER_MODEL, [request(0.0)], 3600.0)
    # the job is allocated after the queue wait; the last tick with traffic is 30 s (the request is held
    # until the job is ready at 32.5 s); zero at the first tick idle_to_zero_s later, 630 s
    assert result.gpu_hours == pytest.approx((630.0 - S.queue_wait_s) / 3600)
    assert (result.jobs_started, result.peak_jobs) == (1, 1)
    kept = replay(dataclasses.replace(S, idle_to_zero_s=0.0), PER_MODEL, [request(0.0)], 3600.0)
    assert kept.gpu_hours == pytest.approx((3600.0 - S.queue_wait_s) / 3600)


def test_the_warmup_leaves_out_early_requests_and_gpu_time() -> None:
    requests = [request(0.0), request(300.0)]
    result = replay(S, PER_MODEL, requests, 1000.0, warmup_s=100.0)
    assert result.requests == 1 and result.cold_requests == 0
    # the tick after the request at 300 s sees its arrival (310 s): zero 600 s later; GPU time from 100 s
    assert result.gpu_hours == pytest.approx((910.0 - 100.0) / 3600)


# --- the trace split ------------------------------------------------------------------------------------


def small_trace() -> Trace:
    arrivals = tuple(float(t) for t in range(0, 1000, 2))
    return Trace(arrivals, (100,) * len(arrivals), (10,) * len(arrivals), "small")


def test_zipf_shares_fall_as_one_over_rank() -> None:
    shares = zipf_weights(12, 1.0)
    assert sum(shares) == pytest.approx(1.0) and shares[0] / shares[11] == pytest.approx(12.0)


def test_the_split_is_seeded_loops_the_trace_and_thins_it() -> None:
    trace = small_trace()
    one = split_trace(trace, models=3, exponent=1.0, seed=7, hours=0.5, keep=1.0)
    assert one == split_trace(trace, models=3, exponent=1.0, seed=7, hours=0.5, keep=1.0)
    assert one != split_trace(trace, models=3, exponent=1.0, seed=8, hours=0.5, keep=1.0)
    assert len(one) == 900 and one[500].at == pytest.approx(trace.span_s)  # looped after its span
    assert max(r.at for r in one) < 1800
    counts = [sum(1 for r in one if r.model == m) for m in range(3)]
    assert counts[0] > counts[1] > counts[2]
    thin = split_trace(trace, models=3, exponent=1.0, seed=7, hours=0.5, keep=0.1)
    assert 50 <= len(thin) <= 130


def test_a_replay_is_deterministic() -> None:
    requests = split_trace(small_trace(), models=4, exponent=1.0, seed=3, hours=0.5)
    for policy in POLICIES:
        assert replay(S, policy, requests, 1800.0) == replay(S, policy, requests, 1800.0)


def test_a_file_that_is_no_request_trace_is_refused_naming_the_fix(tmp_path: Path) -> None:
    bad = tmp_path / "pods.csv"
    bad.write_text("submit_time_s,num_gpus\n1,2\n")
    with pytest.raises(ValidationError, match="fix: pass a CSV with arrival_time_s"):
        read_trace(bad)
    with pytest.raises(ValidationError, match="cannot read trace"):
        read_trace(tmp_path / "missing.csv")


# --- the shared trace -----------------------------------------------------------------------------------


@pytest.mark.skipif(not CONV.is_file(), reason="no shared traces")
def test_every_policy_on_two_hours_of_the_azure_conversation_trace() -> None:
    trace = read_trace(CONV)
    assert len(trace.arrivals) == 19366 and 3400 < trace.span_s < 3600
    requests = split_trace(trace, models=12, exponent=1.0, seed=0, hours=2.0)
    results = {p.name: replay(S, p, requests, 7200.0, warmup_s=3600.0) for p in POLICIES}
    measured = sum(1 for r in requests if r.at >= 3600.0)
    assert {r.requests for r in results.values()} == {measured}
    per_model = results[PER_MODEL.name]
    # at the trace's own rate every model is busy all hour: 12 jobs, none idle, nothing waits
    assert per_model.gpu_hours == pytest.approx(12.0) and per_model.waited_over_10s == 0
    assert results[TIERS.name].gpu_hours == pytest.approx(12.0)
    floor = results[POOLS.name]
    assert floor.gpu_hours == pytest.approx(3.0) and floor.ttft_p99 < 5.0  # 12 models / K=4 = 3 jobs
    assert results[SUMMED.name].gpu_hours < per_model.gpu_hours
    for result in results.values():
        assert 0.05 < result.ttft_p50 < 1.0
