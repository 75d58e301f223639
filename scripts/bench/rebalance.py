"""Compare lending policies on the shared traces with hpcserve's simulator (hpcserve/replay/, the same code as
``hpcserve simulate``): the baseline every hpcserve policy is measured against is ``slurm-preempt``, Slurm's
own preemption over overlapping partitions on every node (hpcserve/replay/overlap.py says what is modelled).

Run from the repo root: scripts/bench/rebalance [--days 14] [--warmup-days 1] [--seeds 0 1 2] [--jobs 2]
[--inference-traces servegen azure-code] [--policies ...] (the wrapper runs this file with .venv/bin/python).
A short check: scripts/bench/rebalance --days 1 --seeds 0.

Policies (default): static (a fixed split for the inference peak, context only), slurm-preempt (the
baseline), moves-predictive (hpcserve's node moves with the forecast planner, ``lending: moves``),
overlap-prewarm (hpcserve's default, ``lending: overlap``: Slurm's preemption plus a pre-warm floor from
what runs now plus the forecast's rise, the recent ramp and, for bursty traffic, a standing share of the
forecast (hpcserve/replay/floor.py, RiseRate), and gentle victims that checkpoint on the signal),
prewarm-foresight (the floor set from the true busiest 10 s ahead), overlap-gentle
(gentle victims that save on the signal, no pre-warm: what the victim choice alone does) and
lending-bound (a near-lower bound on lending's cost to training: no replica start, grace or lost work,
inference holds only what the next 20 s need; its SLO is not a goal). Also available: oracle (the best
node-moving split, not a bound), reactive, slurm-preempt-youngest, planner-foresight.

Traces, read where they lie (../shared/traces/ beside the repo): the Alibaba GPU 2023 (openb) pods for
training (each pod GPU a whole node: 1-8-node jobs), compressed in time to 0.7 of the training
partition's GPUs, or with --training-load 0.8 to a busier second workload (with small jobs instead, 1-8
GPUs on one node, the trace spans too few days to reach the load: 36 GPUs offered); for inference
ServeGen m-large (14 days of 10-minute rates) and the Azure 2023 code trace (one hour of requests at
their real timestamps, repeated). The site is site_configs/example-onprem.yaml (64
nodes x 8 GPUs; the node-moving policies lend the managed pool gpu[033-048], the lending policies
share every node). Job classes: ``hpcserve.replay.scenario.default_policy`` (training preemptible, 120 s
grace).

Printed per trace, mean over the seeds: training queueing mean and p95, JCT, SLO met (share of requests
waiting <= 10 s), p99 wait, preemptions, lost GPU-hours, mean inference nodes; then overlap-prewarm
against slurm-preempt: the ratio of each figure, and whether it dominates (queue mean ratio <= 1.0, SLO
>= 99.9%, fewer lost GPU-hours). It reports, it does not test: always exits 0 when the inputs load.
Default 14 measured days after 1 day of warm-up, about 3 minutes per seed on 2 cores (both traces, 7
policies).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

from hpcserve.config import load_site_config
from hpcserve.replay.compare import EXTRA, POLICIES, Inputs, run_policies
from hpcserve.replay.metrics import PolicyResult
from hpcserve.replay.report import duration, label
from hpcserve.replay.scenario import SimSettings, default_policy, describe

REPO = Path(__file__).resolve().parents[2]
TRACES = REPO.parent / "shared" / "traces"
SITE = REPO / "site_configs" / "example-onprem.yaml"
INFERENCE = {"servegen": "servegen_total_rate_10min.csv", "azure-code": "azure_llm_2023_code.csv"}
DEFAULT_POLICIES = (
    "static", "slurm-preempt", "predictive", "overlap-prewarm", "prewarm-foresight", "overlap-gentle",
    "lending-bound",
)  # fmt: skip
BASELINE, DEFAULT = "slurm-preempt", "overlap-prewarm"
SLO_GOAL = 0.999
COLUMNS = (
    "POLICY", "QUEUE MEAN", "QUEUE P95", "JCT MEAN", "SLO MET", "P99 WAIT", "PREEMPT", "LOST GPU-H",
    "INF NODES",
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--site", type=Path, default=SITE, help="site config (default example-onprem)")
    p.add_argument("--training-trace", type=Path, default=TRACES / "alibaba_gpu2023_openb_pods.csv")
    p.add_argument("--traces-dir", type=Path, default=TRACES, help="where the inference traces lie")
    p.add_argument("--inference-traces", nargs="+", choices=sorted(INFERENCE), default=list(INFERENCE))
    p.add_argument("--policies", nargs="+", choices=(*POLICIES, *EXTRA), default=list(DEFAULT_POLICIES))
    p.add_argument("--days", type=float, default=14.0, help="days measured (default 14)")
    p.add_argument("--warmup-days", type=float, default=1.0, help="days replayed first (default 1)")
    p.add_argument("--jobs", type=int, default=2, help="policies replayed at once (default 2)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="arrival-noise seeds (mean)")
    p.add_argument(
        "--training-load", type=float, default=SimSettings().training_load,
        help="offered training GPUs / the training partition's GPUs (default 0.7; 0.8: the second, busier "
        "training workload)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.days <= 0 or args.warmup_days < 0 or args.jobs < 1 or not 0 < args.training_load <= 1:
        p.error("--days must be > 0, --warmup-days >= 0, --jobs >= 1, 0 < --training-load <= 1")
    for trace in (args.training_trace, *(args.traces_dir / INFERENCE[t] for t in args.inference_traces)):
        if not trace.is_file():
            p.error(f"trace not found: {trace}; pass --training-trace / --traces-dir")
    return args


def mean_results(runs: Sequence[Sequence[PolicyResult]]) -> list[PolicyResult]:
    """Per policy, every figure averaged over the runs (one run per seed, policies in the same order)."""
    means = []
    for same in zip(*runs, strict=True):
        figures = {
            f.name: sum(getattr(r, f.name) for r in same) / len(same)
            for f in dataclasses.fields(PolicyResult)
            if f.name != "policy"
        }
        means.append(dataclasses.replace(same[0], **figures))
    return means


def table(results: Sequence[PolicyResult]) -> str:
    cells = [COLUMNS] + [
        (
            label(r.policy),
            duration(r.queue_mean_s),
            duration(r.queue_p95_s),
            duration(r.jct_mean_s),
            f"{r.slo_attainment:.2%}",
            duration(r.p99_wait_s),
            f"{r.preemptions:.0f}",
            f"{r.lost_gpu_h:.1f}",
            f"{r.mean_inference_nodes:.2f}",
        )
        for r in results
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        for line in cells
    )


RATIOS = (
    ("queue mean", "queue_mean_s"),
    ("queue p95", "queue_p95_s"),
    ("JCT", "jct_mean_s"),
    ("p99 wait", "p99_wait_s"),
    ("preemptions", "preemptions"),
    ("lost GPU-h", "lost_gpu_h"),
    ("inference nodes", "mean_inference_nodes"),
)


def _ratio(ours: float, base: float) -> float:
    """ours / base; 1.0 when both are 0 (equal), inf when only base is."""
    if base:
        return ours / base
    return 1.0 if not ours else float("inf")


def ratios(results: Sequence[PolicyResult]) -> list[str]:
    """overlap-prewarm against slurm-preempt, and whether it dominates."""
    by = {r.policy: r for r in results}
    if BASELINE not in by or DEFAULT not in by:
        return []
    base, ours = by[BASELINE], by[DEFAULT]
    ratio = _ratio(ours.queue_mean_s, base.queue_mean_s)
    checks = {
        "queue mean ratio <= 1.0": ratio <= 1.0,
        f"SLO >= {SLO_GOAL:.1%}": ours.slo_attainment >= SLO_GOAL,
        "fewer lost GPU-h": ours.lost_gpu_h < base.lost_gpu_h,
    }
    return [
        f"{DEFAULT} / {BASELINE}: queue mean {duration(ours.queue_mean_s)} / {duration(base.queue_mean_s)} = "
        f"{ratio:.2f}; SLO {ours.slo_attainment:.2%} vs {base.slo_attainment:.2%}; lost GPU-h "
        f"{ours.lost_gpu_h:.1f} vs {base.lost_gpu_h:.1f}",
        f"ratios ({DEFAULT} / {BASELINE}): "
        + ", ".join(f"{name} {_ratio(getattr(ours, f), getattr(base, f)):.3f}" for name, f in RATIOS),
        "dominates: "
        + ("YES" if all(checks.values()) else "NO")
        + " ("
        + ", ".join(f"{name} {'ok' if ok else 'MISS'}" for name, ok in checks.items())
        + ")",
    ]


def _progress(result: PolicyResult) -> None:
    print(f"  {result.policy}: replayed in {result.wall_s:.0f} s", flush=True)


def run_trace(args: argparse.Namespace, trace: Path) -> list[PolicyResult]:
    site = load_site_config(args.site)
    runs = []
    for seed in args.seeds:
        settings = SimSettings(
            days=args.days, warmup_days=args.warmup_days, seed=seed, training_load=args.training_load
        )
        inputs = Inputs(site, default_policy(site), args.training_trace, trace, settings)
        scenario = inputs.scenario()
        print(f"seed {seed}: " + " ".join(f"{key}={value}" for key, value in describe(scenario).items()))
        started = time.perf_counter()
        runs.append(
            run_policies(inputs, args.policies, workers=args.jobs, scenario=scenario, progress=_progress)
        )
        print(f"seed {seed}: all policies in {time.perf_counter() - started:.0f} s ({args.jobs} at once)\n")
    return mean_results(runs)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    summary = []
    for name in args.inference_traces:
        results = run_trace(args, args.traces_dir / INFERENCE[name])
        seeds = ", ".join(map(str, args.seeds))
        load = f"training load {args.training_load:g}"
        block = (
            f"{name}, {args.days:g} days, {load}, mean over seeds {seeds}:\n{table(results)}\n"
            + "\n".join(ratios(results))
        )
        print(block + "\n", flush=True)
        summary.append(block)
    print("summary\n\n" + "\n\n".join(summary))


if __name__ == "__main__":
    main()
