"""``templates``, ``render``, ``submit`` and ``train``: the training side of the CLI.

Slurm's own flags (-p -N -t --gpus-per-node ...) mean what they mean to sbatch; what a user leaves out
comes from the template's ``#SBATCH`` lines, then from the job class in the policy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from hpcserve.identity import current_user

if TYPE_CHECKING:
    from hpcserve.cli.main import Context
    from hpcserve.jobs.sbatch_header import SbatchDefaults
    from hpcserve.jobs.spec import JobRequest
    from hpcserve.jobs.submit import PlannedJob, Submitter
    from hpcserve.jobs.templates import Template

F = TypeVar("F", bound=Callable[..., Any])
CLASSES = ("training", "batch", "inference", "interactive")
JSON_HELP = "Print machine-readable JSON instead of text."


@dataclass(frozen=True, slots=True)
class JobOptions:
    """The sbatch-style flags as given; None where the user said nothing."""

    job_class: str | None
    partition: str | None
    nodes: int | None
    gpus_per_node: int | None
    ntasks_per_node: int | None
    cpus_per_task: int | None
    time: str | None
    job_name: str | None
    account: str | None
    array: str | None
    output: str | None
    hold: bool


_JOB_FLAGS = [
    click.option("--class", "job_class", type=click.Choice(CLASSES), help="Job class in the policy."),
    click.option("-p", "--partition", help="Partition (must be the job class's)."),
    click.option("-N", "--nodes", type=click.IntRange(1), help="Number of nodes."),
    click.option("--gpus-per-node", type=click.IntRange(0), help="GPUs on each node (as GRES)."),
    click.option("--ntasks-per-node", type=click.IntRange(1), help="Tasks on each node."),
    click.option("-c", "--cpus-per-task", type=click.IntRange(1), help="CPUs for each task."),
    click.option("-t", "--time", help="Time limit: D-HH:MM:SS, HH:MM:SS or minutes."),
    click.option("-J", "--job-name", help="Job name."),
    click.option("-A", "--account", help="Slurm account to charge."),
    click.option("-a", "--array", help="Job array, e.g. 0-9 or 0-99%10."),
    click.option("-o", "--output", help="sbatch --output file pattern, e.g. logs/%x-%j.out."),
    click.option("-H", "--hold", is_flag=True, help="Submit held; `scontrol release JOBID` starts it."),
]


def job_flags(func: F) -> F:
    for flag in reversed(_JOB_FLAGS):
        func = flag(func)
    return func


def _options(kw: dict[str, Any]) -> JobOptions:
    return JobOptions(**{name: kw.pop(name) for name in JobOptions.__slots__})


def build_request(opts: JobOptions, defaults: SbatchDefaults, job_class: str, name: str) -> JobRequest:
    """Flags first, then the script's #SBATCH lines, then hpcserve's defaults."""
    from hpcserve.config.policy import JobClassName
    from hpcserve.jobs.policy import time_option
    from hpcserve.jobs.spec import JobRequest

    time_text = opts.time or defaults.time
    return JobRequest(
        job_class=JobClassName(opts.job_class or job_class),
        name=opts.job_name or defaults.job_name or name,
        user=current_user(),
        partition=opts.partition or defaults.partition,
        nodes=_first(opts.nodes, defaults.nodes, 1),
        gpus_per_node=_first(opts.gpus_per_node, defaults.gpus_per_node, 0),
        tasks_per_node=_first(opts.ntasks_per_node, defaults.tasks_per_node, 1),
        cpus_per_task=opts.cpus_per_task or defaults.cpus_per_task,
        time_s=time_option(time_text) if time_text else None,
        array=opts.array or defaults.array,
        account=opts.account,
        output=opts.output,
        hold=opts.hold,
    )


def _first(*values: int | None) -> int:
    return next(v for v in values if v is not None)


def _submitter(ctx: Context) -> Submitter:
    from hpcserve.jobs import probe
    from hpcserve.jobs.submit import Submitter
    from hpcserve.slurm.factory import make_client

    site = ctx.require_site()
    policy = ctx.load_policy(site)
    degraded = probe.load_degraded(_probe_path(), datetime.now(UTC))
    return Submitter(make_client(site), site, policy, degraded)


def _probe_path() -> Path:
    from hpcserve.jobs.probe import DEFAULT_PATH

    return Path(os.environ.get("HPCSERVE_PROBE_FILE") or DEFAULT_PATH)


def _parse_sets(pairs: tuple[str, ...]) -> dict[str, str]:
    from hpcserve.errors import ValidationError

    values: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ValidationError(f"--set {pair!r}: expected NAME=VALUE (fix: e.g. --set STEPS=10)")
        values[key] = value
    return values


def _plan_template(submitter: Submitter, name: str, sets: tuple[str, ...], kw: dict[str, Any]) -> PlannedJob:
    from hpcserve.jobs.sbatch_header import sbatch_defaults
    from hpcserve.jobs.templates import load_template, templates_dir

    template = load_template(name, templates_dir())
    opts = _options(kw)
    request = build_request(opts, sbatch_defaults(template.path.read_text()), _class_of(template), name)
    return submitter.plan_template(template, _parse_sets(sets), request)


def _class_of(template: Template) -> str:
    return str(getattr(template, "job_class", None) or "training")


def _planned_json(planned: PlannedJob) -> dict[str, Any]:
    return {"sbatch_args": planned.sbatch_args(), "placement": planned.placement, "tag": planned.job.tag,
            "nodes": list(planned.job.nodelist), "env": dict(planned.job.env)}  # fmt: skip


@click.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def templates(name: str | None, as_json: bool) -> None:
    """List job templates, or show one template's parameters."""
    from hpcserve.cli.output import emit_json, emit_table
    from hpcserve.jobs.templates import list_templates, load_template, templates_dir

    found = [load_template(name, templates_dir())] if name else list_templates(templates_dir())
    if as_json:
        emit_json([{"name": t.name, "description": t.description, "path": str(t.path),
                    "params": [_param_json(p) for p in t.params]} for t in found])  # fmt: skip
        return
    if not name:
        emit_table(
            f"{len(found)} templates", ("TEMPLATE", "DESCRIPTION"), [(t.name, t.description) for t in found]
        )
        return
    params = [(p.name, p.type, "" if p.default is None else str(p.default), p.help) for p in found[0].params]
    emit_table(f"{found[0].name}: {found[0].description}", ("PARAM", "TYPE", "DEFAULT", "HELP"), params)


def _param_json(param: Any) -> dict[str, Any]:
    return {"name": param.name, "type": param.type, "default": param.default, "help": param.help,
            "choices": list(param.choices or ())}  # fmt: skip


def template_command(func: Callable[..., Any]) -> Callable[..., Any]:
    """The arguments `render` and `submit` share: a template, its parameters, sbatch-style flags, --json."""
    func = click.pass_obj(func)
    func = click.option("--json", "as_json", is_flag=True, help=JSON_HELP)(func)
    func = job_flags(func)
    func = click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help="Set a parameter.")(func)
    return click.argument("template")(func)


@click.command()
@template_command
def render(ctx: Context, /, template: str, sets: tuple[str, ...], as_json: bool, **kw: Any) -> None:
    """Print the exact script (and sbatch options) that `submit` would send; submits nothing."""
    planned = _plan_template(_submitter(ctx), template, sets, kw)
    if as_json:
        from hpcserve.cli.output import emit_json

        emit_json({"script": planned.script, **_planned_json(planned)})
        return
    click.echo(planned.script, nl=False)


@click.command()
@template_command
def submit(ctx: Context, /, template: str, sets: tuple[str, ...], as_json: bool, **kw: Any) -> None:
    """Submit a job template with parameters, policy checks and topology-aware placement."""
    submitter = _submitter(ctx)
    planned = _plan_template(submitter, template, sets, kw)
    job_id = submitter.submit(planned)
    if as_json:
        from hpcserve.cli.output import emit_json

        emit_json({"job_id": job_id, **_planned_json(planned)})
        return
    click.echo(f"submitted {job_id}: {template} ({planned.placement})")


@click.command()
@click.argument("target", metavar="MODULE:FUNCTION")
@click.argument("args", nargs=-1)
@job_flags
@click.option("--sweep", help="JSON list of argument lists, one array task each: '[[1], [2], [3]]'.")
@click.option("--folder", type=click.Path(file_okay=False, path_type=Path), default=Path("hpcserve-jobs"),
              show_default=True, help="Where submitit keeps pickles and logs (shared disk).")  # fmt: skip
@click.option("--wait", is_flag=True, help="Wait for the result(s) and print them.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.pass_obj
def train(ctx: Context, /, target: str, args: tuple[str, ...], sweep: str | None, folder: Path, wait: bool,
          as_json: bool, **kw: Any) -> None:  # fmt: skip
    """Run a Python function as a Slurm job through submitit (torch.distributed env, requeue if preempted)."""
    from hpcserve.jobs.callables import resolve_callable
    from hpcserve.jobs.sbatch_header import SbatchDefaults

    fn = resolve_callable(target)
    request = build_request(_options(kw), SbatchDefaults(), "training", target.rpartition(":")[2])
    jobs, planned = _submitter(ctx).submit_callable(request, fn, args, folder.resolve(), _sweep(sweep))
    results = [job.result() for job in jobs] if wait else None
    if as_json:
        from hpcserve.cli.output import emit_json

        emit_json({"job_ids": [j.job_id for j in jobs], "results": results, **_planned_json(planned)})
        return
    click.echo(f"submitted {' '.join(j.job_id for j in jobs)}: {target} ({planned.placement})")
    for job, result in zip(jobs, results or [], strict=False):
        click.echo(f"{job.job_id}: {result!r}")


def _sweep(text: str | None) -> list[tuple[Any, ...]] | None:
    from hpcserve.errors import ValidationError

    if text is None:
        return None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"--sweep: not JSON ({exc.msg}) (fix: e.g. --sweep '[[1], [2]]')") from exc
    if not isinstance(items, list) or not items:
        raise ValidationError("--sweep: expected a non-empty JSON list (fix: e.g. --sweep '[[1], [2]]')")
    return [tuple(item) if isinstance(item, list) else (item,) for item in items]


@click.command("probe")
@click.argument("output", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--fraction", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="A node below this share of the median node's bandwidth is degraded.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def probe_cmd(output: Path, fraction: float, as_json: bool) -> None:
    """Record an nccl-probe job's output: its degraded nodes are kept out of placement."""
    from dataclasses import asdict

    from hpcserve.jobs import probe

    found = probe.verdict(output.read_text(errors="replace"), datetime.now(UTC), fraction)
    probe.save(_probe_path(), found)
    if as_json:
        from hpcserve.cli.output import emit_json

        emit_json(asdict(found))
        return
    for node in found.nodes:
        mark = "  DEGRADED" if node.node in found.degraded else ""
        click.echo(f"{node.node}: p2p {node.p2p_gbps:.3f} GB/s, busbw {node.busbw_gbps:.3f} GB/s{mark}")
    click.echo(f"degraded: {', '.join(found.degraded) or 'none'} (kept out of placement; {_probe_path()})")
