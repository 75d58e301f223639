"""Compare node-split policies on the shared traces: static, reactive, predictive, oracle (and the
planner told the true future, planner-foresight), with hpcserve's simulator (hpcserve/sim/, the same
code as ``hpcserve simulate``).

Run from the repo root: scripts/bench/rebalance [--site YAML] [--days 14] [--warmup-days 1] [--jobs 2]
[--seeds 0 1 2] [--no-foresight] (the wrapper runs this file with .venv/bin/python). One seed takes about
3 minutes on 2 cores; the training figures move by tens of percent from seed to seed (preemptions and
big jobs interact), so the goals are checked on the mean over the seeds given.

The traces are read where they lie, ../shared/traces/ beside the repo by default: the Alibaba GPU 2023
(openb) pods for training and the ServeGen m-large total rate (14 days of 10-minute windows, repeated
after) for inference. The site is site_configs/example-onprem.yaml: 64 nodes x 8 GPUs, training
gpu[001-040], inference gpu[041-064], the managed pool gpu[033-048], so inference has 16 to 32 nodes.
Job classes and rebalance rules: the replay's default policy (``hpcserve.sim.scenario.default_policy``:
training preemptible with 120 s grace, the default rebalance rules of policies/default.yaml), since
policies/default.yaml is sized for the minicluster (16 GPUs per job at most).

Goals (PASS/MISS; always exits 0 when the inputs load: it reports, it does not test):
- training mean queueing delay, static / predictive >= 2.0;
- inference SLO attainment of predictive >= 99%: the share of requests that waited <= slo_wait_s (10 s);
- gap of predictive to the oracle <= 10%: the relative difference in training mean queueing delay,
  (predictive - oracle) / oracle, at equal SLO: both meet the 99% SLO goal (else MISS, whatever the gap).
  The oracle is the perfect-foresight split (``hpcserve.sim.policies.IdealSplit``): inference gets
  exactly the nodes the true load ahead needs, with no planner headroom, hysteresis or cooldown, under
  the same replay mechanics as the other policies (move delay, replica drain, preemption grace and lost
  work, replica start-up). The gap is what the service's planner and forecast cost against it.
Also printed: node moves per day, and planner-foresight, the planner told the true future demand over
its horizon (predictive against it is what the forecast alone costs; not a goal).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

from hpcserve.config import load_site_config
from hpcserve.sim.compare import EXTRA, POLICIES, Inputs, run_policies
from hpcserve.sim.metrics import PolicyResult
from hpcserve.sim.report import text_table
from hpcserve.sim.scenario import SimSettings, default_policy, describe

REPO = Path(__file__).resolve().parents[2]
TRACES = REPO.parent / "shared" / "traces"
SITE = REPO / "site_configs" / "example-onprem.yaml"
RATIO_GOAL = 2.0
SLO_GOAL = 0.99
GAP_GOAL = 0.10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--site", type=Path, default=SITE, help="site config (default example-onprem)")
    p.add_argument("--training-trace", type=Path, default=TRACES / "alibaba_gpu2023_openb_pods.csv")
    p.add_argument("--inference-trace", type=Path, default=TRACES / "servegen_total_rate_10min.csv")
    p.add_argument("--days", type=float, default=14.0, help="days measured (default 14)")
    p.add_argument("--warmup-days", type=float, default=1.0, help="days replayed first (default 1)")
    p.add_argument("--jobs", type=int, default=2, help="policies replayed at once (default 2)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="arrival-noise seeds; goals on the mean")
    p.add_argument("--no-foresight", dest="foresight", action="store_false", help="skip planner-foresight")
    args = p.parse_args(argv)
    if args.days <= 0 or args.warmup_days < 0 or args.jobs < 1:
        p.error("--days must be > 0, --warmup-days >= 0, --jobs >= 1")
    for trace in (args.training_trace, args.inference_trace):
        if not trace.is_file():
            p.error(f"trace not found: {trace}; pass --training-trace / --inference-trace")
    return args


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def goals(results: Sequence[PolicyResult], slo_s: float) -> list[str]:
    by = {r.policy: r for r in results}
    static, pred, oracle = by["static"], by["predictive"], by["oracle"]
    ratio = static.queue_mean_s / pred.queue_mean_s if pred.queue_mean_s else float("inf")
    gap = (pred.queue_mean_s - oracle.queue_mean_s) / oracle.queue_mean_s if oracle.queue_mean_s else 0.0
    equal_slo = min(pred.slo_attainment, oracle.slo_attainment) >= SLO_GOAL
    return [
        f"training mean queueing delay, static / predictive: {static.queue_mean_s:.0f} s / "
        f"{pred.queue_mean_s:.0f} s = {ratio:.2f} (goal >= {RATIO_GOAL}) {verdict(ratio >= RATIO_GOAL)}",
        f"inference SLO attainment of predictive (wait <= {slo_s:g} s): {pred.slo_attainment:.2%}, p99 wait "
        f"{pred.p99_wait_s:.1f} s (goal >= {SLO_GOAL:.0%}) {verdict(pred.slo_attainment >= SLO_GOAL)}",
        f"gap of predictive to oracle, (queue_pred - queue_oracle) / queue_oracle: {gap:+.1%} at SLO "
        f"{pred.slo_attainment:.2%} vs {oracle.slo_attainment:.2%} (goal <= {GAP_GOAL:.0%} with both SLO "
        f">= {SLO_GOAL:.0%}) {verdict(gap <= GAP_GOAL and equal_slo)}",
        "node moves per day: " + ", ".join(f"{r.policy} {r.moves_per_day:.1f}" for r in results),
    ]


def _progress(result: PolicyResult) -> None:
    print(f"  {result.policy}: replayed in {result.wall_s:.0f} s", flush=True)


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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    site = load_site_config(args.site)
    names = (*POLICIES, *EXTRA) if args.foresight else POLICIES
    runs = []
    for seed in args.seeds:
        settings = SimSettings(days=args.days, warmup_days=args.warmup_days, seed=seed)
        inputs = Inputs(site, default_policy(site), args.training_trace, args.inference_trace, settings)
        scenario = inputs.scenario()
        print(f"seed {seed}: " + " ".join(f"{key}={value}" for key, value in describe(scenario).items()))
        started = time.perf_counter()
        runs.append(run_policies(inputs, names, workers=args.jobs, scenario=scenario, progress=_progress))
        print(f"all policies in {time.perf_counter() - started:.0f} s ({args.jobs} at once)\n")
        print(text_table(runs[-1]) + "\n")
    results = mean_results(runs)
    if len(runs) > 1:
        print(f"mean over seeds {', '.join(map(str, args.seeds))}:\n{text_table(results)}\n")
    for line in goals(results, settings.slo_wait_s):
        print(line)


if __name__ == "__main__":
    main()
