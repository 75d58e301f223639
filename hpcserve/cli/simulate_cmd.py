"""``hpcserve simulate``: replay a training-job trace and an inference-arrival trace on the site, and
compare node-split policies (static, reactive, predictive, oracle) and lending through Slurm's preemption
(slurm-preempt, overlap-prewarm, prewarm-foresight) with the service's own placement,
autoscaler, forecast and planner. How the traces are scaled and what is approximated: hpcserve/replay/."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from hpcserve.cli.main import Context
    from hpcserve.replay.metrics import PolicyResult

TRAINING_TRACE = "alibaba_gpu2023_openb_pods.csv"
INFERENCE_TRACE = "servegen_total_rate_10min.csv"
JSON_HELP = "Print machine-readable JSON instead of a table."
SIM_POLICIES = (
    "static", "reactive", "predictive", "oracle", "planner-foresight",
    "slurm-preempt", "slurm-preempt-youngest", "overlap-prewarm", "prewarm-foresight", "overlap-gentle",
    "lending-bound",
)  # fmt: skip
TRACE = click.Path(exists=True, dir_okay=False, path_type=Path)


def trace_dirs() -> list[Path]:
    """Where the shared traces may lie: shared/traces beside the repo (from the working directory or from
    this file), first found first."""
    starts = [Path.cwd(), *Path(__file__).resolve().parents]
    return [start.parent / "shared" / "traces" for start in starts]


def default_trace(name: str, flag: str) -> Path:
    from hpcserve.errors import ValidationError

    for folder in trace_dirs():
        if (folder / name).is_file():
            return folder / name
    raise ValidationError(
        f"no {flag} given and no shared/traces/{name} beside the repo (fix: pass {flag} PATH/{name})"
    )


@click.command("simulate", short_help="Replay traces and compare node-split policies.")
@click.option(
    "--training-trace", type=TRACE, help=f"openb pod CSV [default: shared/traces/{TRAINING_TRACE}]."
)
@click.option(
    "--inference-trace",
    type=TRACE,
    help=f"ServeGen rate CSV or Azure/Mooncake request CSV [default: shared/traces/{INFERENCE_TRACE}].",
)
@click.option(
    "--days", type=click.FloatRange(min=0.01), default=14.0, show_default=True, help="Days measured."
)
@click.option(
    "--warmup-days", type=click.FloatRange(min=0), default=1.0, show_default=True, help="Days replayed first."
)
@click.option(
    "--policy",
    "policies",
    multiple=True,
    type=click.Choice(SIM_POLICIES),  # compare.py's POLICIES + EXTRA
    help="Policy to replay (repeat; default: static, reactive, predictive, oracle). slurm-preempt is Slurm's "
    "own preemption over overlapping partitions (the baseline); overlap-prewarm is lending: overlap. Not the "
    "job-class policy file: that is hpcserve --policy FILE.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the arrival noise.")
@click.option("-j", "--jobs", "workers", type=click.IntRange(1), default=1, show_default=True,
              help="Replay this many policies at once (processes).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.pass_obj
def simulate(
    ctx: Context,
    training_trace: Path | None,
    inference_trace: Path | None,
    days: float,
    warmup_days: float,
    policies: tuple[str, ...],
    seed: int,
    workers: int,
    as_json: bool,
) -> None:
    """Replay the traces on the site (--site) with each split policy and print their figures.

    The job classes and rebalance rules come from hpcserve --policy FILE when given; otherwise a
    replay policy is assumed (training preemptible with 120 s grace, default rebalance rules).
    """
    from hpcserve.replay.compare import POLICIES, Inputs, run_policies
    from hpcserve.replay.scenario import SimSettings, default_policy, describe

    site = ctx.require_site()
    policy = ctx.load_policy(site) if ctx.policy_path else default_policy(site)
    inputs = Inputs(
        site=site,
        policy=policy,
        training_trace=training_trace or default_trace(TRAINING_TRACE, "--training-trace"),
        inference_trace=inference_trace or default_trace(INFERENCE_TRACE, "--inference-trace"),
        settings=SimSettings(days=days, warmup_days=warmup_days, seed=seed),
    )
    scenario = inputs.scenario()
    results = run_policies(inputs, policies or POLICIES, workers=workers, scenario=scenario)
    _emit(describe(scenario), results, as_json)


def _emit(scenario: dict[str, object], results: list[PolicyResult], as_json: bool) -> None:
    from hpcserve.cli.output import emit_json, emit_table
    from hpcserve.replay.report import COLUMNS, rows

    if as_json:
        emit_json({"scenario": scenario, "results": [result.as_dict() for result in results]})
        return
    click.echo(" ".join(f"{key}={value}" for key, value in scenario.items()))
    emit_table(f"{len(results)} split policies over {scenario['days']:g} days", COLUMNS, rows(results))
