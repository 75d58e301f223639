"""Where models live: one replica per model vs residency tiers vs tiers + pools, replayed over the Azure
LLM 2023 conversation trace with hpcserve's residency replay (hpcserve/replay/residency.py: the
service's autoscaler and tier decisions, the engine simulator's latency model and sleep/wake timings).

Run from the repo root: scripts/bench/residency [--trace PATH] [--hours 24] [--keep 1 0.1 0.01]
(the wrapper runs this file with .venv/bin/python). hpcserve does not ship the trace: by default it is
read where it lies, ../shared/traces/azure_llm_2023_conv.csv beside the repo.

The trace holds about one hour (19,366 requests, 5.5 per second); a day is that hour looped (each loop's
models drawn afresh), after ``--warmup-hours`` that the figures leave out (every policy starts at zero).
Each request is given one of ``--models`` models by Zipf popularity (``--zipf``, seeded). ``--keep``
thins the trace (each request kept with that probability) to replay quieter models as well: at the
trace's own rate every one of 12 models gets a request every few seconds, so none ever idles long
enough for a tier to matter; at 1/10 and 1/100 the less popular ones do.

Policies: per-model (each model its own replica jobs, scaled to zero after 600 s idle), tiers (the same,
idle models asleep after ``--warm-after`` seconds, their jobs kept), tiers+pools (every model in one
pool, K awake per job, the pool scaled on its summed load and never below the controller's awake floor,
hpcserve.serving.pools.awake_floor: ceil(models asked in the last 600 s / K) jobs, the most that asked
for over the last 300 s) and tiers+pools-no-floor (an ablation: the pool on its summed load alone).

Printed per rate: GPU-hours, p50/p99 TTFT, requests that waited over 10 s for admission, the requests
that found their model warm (a running job, no awake engine) and their p99 TTFT, cold requests, jobs
started, wakes; then, per pool policy, the goal: GPU-hours <= 1/3 of per-model at p99 TTFT <= 5 s for
the warm requests (PASS/FAIL). It reports, it does not test: it exits 0 whenever the trace loads.
About 35 s on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from hpcserve.replay.residency import POLICIES, Policy, ResidencyResult, replay
from hpcserve.replay.residency_model import ResidencySettings, Trace, read_trace, split_trace, zipf_weights

REPO = Path(__file__).resolve().parents[2]
TRACE = REPO.parent / "shared" / "traces" / "azure_llm_2023_conv.csv"
BASELINE = "per-model"
GPU_GOAL, WARM_P99_GOAL_S = 1 / 3, 5.0
COLUMNS = ("POLICY", "GPU-H", "TTFT P50", "TTFT P99", "WAITED>10S", "WARM REQS", "WARM P99", "COLD REQS",
           "JOBS", "WAKES")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path, default=TRACE, help="a request trace CSV (default: %(default)s)")
    p.add_argument("--hours", type=float, default=24.0, help="hours measured (default 24)")
    p.add_argument("--warmup-hours", type=float, default=1.0, help="hours replayed first, not measured")
    p.add_argument("--models", type=int, default=12, help="models the requests are split over (default 12)")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of their popularity (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    p.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.1, 0.01], help="trace rates replayed")
    p.add_argument("--warm-after", type=float, default=ResidencySettings().warm_after_s,
                   help="tiers: idle seconds before a model sleeps (default %(default)s)")  # fmt: skip
    p.add_argument(
        "--policies", nargs="+", choices=[q.name for q in POLICIES], default=[q.name for q in POLICIES]
    )
    args = p.parse_args(argv)
    if args.hours <= 0 or args.warmup_hours < 0 or args.models < 1 or not all(0 < k <= 1 for k in args.keep):
        p.error("--hours must be > 0, --warmup-hours >= 0, --models >= 1, every --keep in (0, 1]")
    if not args.trace.is_file():
        p.error(f"trace not found: {args.trace} (hpcserve does not ship it; pass --trace PATH)")
    return args


def describe(args: argparse.Namespace, trace: Trace, settings: ResidencySettings) -> list[str]:
    hours = trace.span_s / 3600
    total = args.hours + args.warmup_hours
    cover = (
        "covers"
        if hours >= total
        else f"covers less than the {total:g} h replayed: looped {total / hours:.1f} times"
    )
    shares = ", ".join(f"{w:.1%}" for w in zipf_weights(args.models, args.zipf))
    s = settings
    return [
        f"trace: {trace.source}, {len(trace.arrivals):,} requests over {hours:.2f} h ({cover}; each loop's "
        f"models drawn afresh); {args.warmup_hours:g} h of warm-up, then {args.hours:g} h measured",
        f"models: {args.models}, Zipf {args.zipf:g} (shares {shares}), seed {args.seed}",
        f"modelled per model: {s.weights_gib:.1f} GiB of weights (8B, bf16); cold start "
        f"{s.cold_start_s:.1f} s (queue {s.queue_wait_s:g} + load {s.weights_gib / s.load_gib_per_s:.1f} + "
        f"init {s.engine_init_s:g}); "
        f"wake {s.wake_s:.1f} s, sleep {s.sleep_s:.1f} s (hpcserve.enginesim.timing)",
        f"pool jobs: K = {s.max_awake} awake ({s.gpu_gib:g} GiB x {s.gpu_share:g} / ({s.weights_gib:.1f} + "
        f"{s.kv_gib:g} GiB KV)), start {s.job_start_s(args.models, s.max_awake):.0f} s ({args.models} "
        f"engines one at a time); windows: warm after {s.warm_after_s:g} s (tiers), zero after "
        f"{s.idle_to_zero_s:g} s; {s.gpus_per_replica} GPU per job, at most {s.max_replicas} jobs per "
        "deployment or pool",
    ]


def seconds(value: float, count: int = 1) -> str:
    return "n/a" if not count else f"{value:.2f} s" if value < 100 else f"{value:,.0f} s"


def table(results: Sequence[ResidencyResult]) -> str:
    cells = [COLUMNS] + [
        (
            r.policy,
            f"{r.gpu_hours:.1f}",
            seconds(r.ttft_p50),
            seconds(r.ttft_p99),
            f"{r.waited_over_10s:,}",
            f"{r.warm_requests:,}",
            seconds(r.warm_ttft_p99, r.warm_requests),
            f"{r.cold_requests:,}",
            f"{r.jobs_started:,}",
            f"{r.wakes:,}",
        )
        for r in results
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        for line in cells
    )


def verdicts(results: Sequence[ResidencyResult]) -> list[tuple[str, bool]]:
    """Per pool policy: (the line, whether it meets the goal) against per-model's GPU-hours."""
    by = {r.policy: r for r in results}
    base = by.get(BASELINE)
    if base is None or not base.gpu_hours:
        return []
    lines = []
    for r in results:
        if "pools" not in r.policy:
            continue
        ratio = r.gpu_hours / base.gpu_hours
        warm_ok = r.warm_ttft_p99 <= WARM_P99_GOAL_S
        ok = ratio <= GPU_GOAL and warm_ok
        warm = (f"{r.warm_ttft_p99:.2f} s over {r.warm_requests:,} warm requests" if r.warm_requests
                else f"n/a: no request found its model warm (p99 of all {r.ttft_p99:.2f} s)")  # fmt: skip
        lines.append((
            f"{r.policy} / {BASELINE}: GPU-hours {r.gpu_hours:.1f} / {base.gpu_hours:.1f} = {ratio:.3f} "
            f"(goal <= {GPU_GOAL:.3f}); warm p99 TTFT {warm} (goal <= {WARM_P99_GOAL_S:g} s): "
            + ("PASS" if ok else "FAIL"),
            ok,
        ))  # fmt: skip
    return lines


def run_rate(args: argparse.Namespace, trace: Trace, keep: float, policies: Sequence[Policy]) -> list[str]:
    settings = ResidencySettings(models=args.models, warm_after_s=args.warm_after)
    total = args.hours + args.warmup_hours
    requests = split_trace(
        trace, models=args.models, exponent=args.zipf, seed=args.seed, hours=total, keep=keep
    )
    measured = sum(1 for r in requests if r.at >= args.warmup_hours * 3600)
    rate = measured / (args.hours * 3600)
    what = "the trace as recorded" if keep == 1 else f"the trace thinned to {keep:g}"
    print(f"\n== rate x{keep:g} ({what}): {rate:.3f} requests/s, {measured:,} measured ==")
    results = []
    for policy in policies:
        started = time.perf_counter()
        results.append(replay(settings, policy, requests, total * 3600, args.warmup_hours * 3600))
        print(f"  {policy.name}: replayed in {time.perf_counter() - started:.1f} s", flush=True)
    print(table(results))
    lines = verdicts(results)
    for line, _ in lines:
        print(line)
    return [f"x{keep:g}: {line}" for line, _ in lines]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    trace = read_trace(args.trace)
    settings = ResidencySettings(models=args.models, warm_after_s=args.warm_after)
    for line in describe(args, trace, settings):
        print(line)
    policies = [q for q in POLICIES if q.name in args.policies]
    summary = [line for keep in args.keep for line in run_rate(args, trace, keep, policies)]
    print("\nsummary (goal: tiers + pools <= 1/3 of per-model's GPU-hours at warm p99 TTFT <= 5 s):")
    for line in summary:
        print("  " + line)


if __name__ == "__main__":
    main()
