"""``hpcserve``: the entry point. Commands parse arguments, call an API function and format the result.

Start time matters (``hpcserve ps`` runs in scripts and loops): only click is imported up front; config
(pydantic, yaml), rich and sqlalchemy are imported inside the commands that need them.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from hpcserve import __version__
from hpcserve.errors import HpcserveError
from hpcserve.identity import current_user

SYSTEM_CONFIG_DIR = Path("/etc/hpcserve")  # site.yaml and policy.yaml when neither flag nor env names them
SITE_FILE, POLICY_FILE = "site.yaml", "policy.yaml"
JSON_HELP = "Print machine-readable JSON instead of a table."
COMPLETE_VAR = "_HPCSERVE_COMPLETE"  # click's shell completion: bash_source, zsh_source, bash_complete, ...

if TYPE_CHECKING:
    from hpcserve.config import Policy, SiteConfig
    from hpcserve.slurm.models import Job
    from hpcserve.slurm.runner import SubprocessRunner
    from hpcserve.store import HistoryStore


def system_config(name: str) -> Path | None:
    """``SYSTEM_CONFIG_DIR/name`` if that file exists (read at call time: tests point it elsewhere)."""
    path = SYSTEM_CONFIG_DIR / name
    return path if path.is_file() else None


class Context:
    """What every command shares: where the config lives and the command runner. Nothing is loaded until a
    command asks.

    The site config and policy are, in this order: ``--site``/``--policy``, else ``HPCSERVE_SITE``/
    ``HPCSERVE_POLICY`` (click reads both into ``site``/``policy``), else ``/etc/hpcserve/site.yaml`` and
    ``/etc/hpcserve/policy.yaml``. What a user passes changes only what their own CLI does: the service
    authorises against its own files.
    """

    def __init__(self, site: Path | None, policy: Path | None, runner: SubprocessRunner | None) -> None:
        self.site_path = site or system_config(SITE_FILE)
        self.policy_path = policy or system_config(POLICY_FILE)
        self._runner = runner

    @property
    def runner(self) -> SubprocessRunner:
        if self._runner is None:
            from hpcserve.slurm.runner import SubprocessRunner

            self._runner = SubprocessRunner()
        return self._runner

    def load_site(self) -> SiteConfig | None:
        """The site config, when one is given; it also names SLURM_CONF if the environment does not."""
        from hpcserve.config import load_site_config

        if self.site_path is None:
            return None
        site = load_site_config(self.site_path)
        if site.slurm.slurm_conf and "SLURM_CONF" not in os.environ:
            os.environ["SLURM_CONF"] = str(site.slurm.slurm_conf)
        return site

    def require_site(self) -> SiteConfig:
        from hpcserve.errors import ValidationError

        site = self.load_site()
        if site is None:
            raise ValidationError("no site config (fix: pass --site or set HPCSERVE_SITE)")
        return site

    def load_policy(self, site: SiteConfig) -> Policy:
        from hpcserve.config import check_policy, load_policy
        from hpcserve.errors import ValidationError

        if self.policy_path is None:
            raise ValidationError("no policy (fix: pass --policy or set HPCSERVE_POLICY)")
        policy = load_policy(self.policy_path)
        check_policy(policy, site, self.policy_path)
        return policy

    @staticmethod
    def database_url(site: SiteConfig | None) -> str:
        """HPCSERVE_DATABASE_URL, else the site config's ``database.url``, else the documented default."""
        from hpcserve.config.sections import DatabaseSettings

        override = os.environ.get("HPCSERVE_DATABASE_URL")
        if override:
            return override
        return site.database_url() if site is not None else DatabaseSettings().resolved_url()

    def store(
        self, site: SiteConfig, extra_admins: tuple[str, ...] = (), *, migrate: bool = False
    ) -> HistoryStore:
        """hpcserve's database. Only its owner opens it: ``migrate`` (the service, at start) brings the schema
        to the newest; otherwise a schema that is not the newest is a ``SchemaOutOfDate`` error naming
        ``hpcserve db upgrade`` (nothing is migrated implicitly)."""
        from hpcserve.store import HistoryStore, SchemaOutOfDate

        store = HistoryStore(self.database_url(site), admins=(*site.admins, *extra_admins))
        if migrate:
            store.upgrade()
            return store
        status = store.schema_status()
        if not status.up_to_date:
            store.close()
            raise SchemaOutOfDate(
                store.url.render_as_string(hide_password=False), status.current, status.head
            )
        return store


pass_ctx = click.make_pass_decorator(Context)

# Commands that live in their own modules, imported only when run (or listed by --help): ``hpcserve ps``
# must not pay for the training side's imports.
LAZY_COMMANDS = {
    "templates": "hpcserve.cli.jobs_cmds:templates",
    "render": "hpcserve.cli.jobs_cmds:render",
    "submit": "hpcserve.cli.jobs_cmds:submit",
    "train": "hpcserve.cli.jobs_cmds:train",
    "probe": "hpcserve.cli.jobs_cmds:probe_cmd",
    "engine-sim": "hpcserve.cli.engine_cmd:engine_sim",
    "gateway": "hpcserve.cli.gateway_cmd:gateway",
    "keys": "hpcserve.cli.keys_cmd:keys",
    "usage": "hpcserve.cli.usage_cmd:usage",
    "db": "hpcserve.cli.db_cmd:db",
    "serve": "hpcserve.cli.serve_cmds:serve",
    "deployments": "hpcserve.cli.serve_cmds:deployments",
    "scale": "hpcserve.cli.serve_cmds:scale",
    "rm": "hpcserve.cli.serve_cmds:rm",
    "logs": "hpcserve.cli.serve_cmds:logs",
    "share": "hpcserve.cli.serve_cmds:share",
    "service": "hpcserve.cli.service_cmd:service",
    "simulate": "hpcserve.cli.simulate_cmd:simulate",
    "rebalance": "hpcserve.cli.rebalance_cmd:rebalance",
    "drain-node": "hpcserve.cli.node_cmd:drain_node",
    "history": "hpcserve.cli.history_cmd:history",
    "idle": "hpcserve.cli.idle_cmd:idle",
    "report": "hpcserve.cli.report_cmd:report",
    "telemetry": "hpcserve.cli.telemetry_cmd:telemetry",
}


class LazyGroup(click.Group):
    """A group whose ``LAZY_COMMANDS`` are imported on first use (click's documented lazy-loading shape)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        import importlib.util

        lazy = [name for name, target in LAZY_COMMANDS.items()
                if importlib.util.find_spec(target.partition(":")[0]) is not None]  # fmt: skip
        return sorted([*super().list_commands(ctx), *lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = LAZY_COMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        import importlib

        module, _, attr = target.partition(":")
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command)
        return command


path_option = click.Path(dir_okay=False, path_type=Path)


@click.group(
    cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="hpcserve")
@click.option(
    "--site", type=path_option, envvar="HPCSERVE_SITE", help="Site config YAML [env HPCSERVE_SITE]."
)
@click.option(
    "--policy", type=path_option, envvar="HPCSERVE_POLICY", help="Policy YAML [env HPCSERVE_POLICY]."
)
@click.pass_context
def cli(ctx: click.Context, site: Path | None, policy: Path | None) -> None:
    """hpcserve: training and LLM inference on one Slurm GPU cluster."""
    ctx.obj = Context(site, policy, ctx.meta.get("hpcserve.runner"))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@pass_ctx
def doctor(ctx: Context, as_json: bool) -> None:
    """Check Slurm, munge, accounting, the config and the database; print the fix for each failure."""
    from hpcserve.doctor import DoctorInput, run_checks

    checks = run_checks(DoctorInput(ctx.runner, ctx.site_path, ctx.policy_path))
    if as_json:
        from hpcserve.cli.output import emit_json

        emit_json([{"check": c.name, "ok": c.ok, "detail": c.detail, "fix": c.fix} for c in checks])
    else:
        for c in checks:
            fix = f" (fix: {c.fix})" if c.fix else ""
            line = f"ok    {c.name}: {c.detail}" if c.ok else f"FAIL  {c.name}: {c.detail}{fix}"
            click.echo(line)
    if not all(c.ok for c in checks):
        sys.exit(1)


@cli.command()
@click.option("-p", "--partition", "partitions", multiple=True, help="Only nodes in this partition.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@pass_ctx
def nodes(ctx: Context, partitions: tuple[str, ...], as_json: bool) -> None:
    """Nodes with partitions, state, GPUs free/total, GPU shards in use/total, leaf switch and fabric."""
    from hpcserve.cli.output import emit_json, emit_table
    from hpcserve.inventory import node_views, shards_cell
    from hpcserve.slurm.factory import make_client

    site = ctx.load_site()
    snapshot = make_client(site).snapshot()
    views = [
        v for v in node_views(snapshot.nodes, site) if not partitions or set(partitions) & set(v.partitions)
    ]
    if as_json:
        emit_json(views)
        return
    rows = [(v.name, ",".join(v.partitions), v.state, f"{v.gpus_free}/{v.gpus_total}", v.gpu_type,
             shards_cell(v), v.switch, v.fabric, ",".join(v.features), v.reason) for v in views]  # fmt: skip
    cols = ("NODE", "PARTITIONS", "STATE", "GPUS FREE/TOTAL", "GPU", "SHARDS USED/TOTAL", "SWITCH", "FABRIC",
            "FEATURES", "REASON")  # fmt: skip
    emit_table(f"{len(views)} nodes", cols, rows)


@cli.command()
@click.option("--me", is_flag=True, help="Only the caller's own jobs.")
@click.option("-u", "--user", help="Only this user's jobs.")
@click.option("-p", "--partition", "partitions", multiple=True, help="Only jobs in this partition.")
@click.option(
    "-t", "--state", "states", multiple=True, help="Only jobs in this state (PENDING, RUNNING, ...)."
)
@click.option("-j", "--job", "job_ids", multiple=True, help="Only these job ids.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@pass_ctx
def ps(ctx: Context, me: bool, user: str | None, partitions: tuple[str, ...], states: tuple[str, ...],
       job_ids: tuple[str, ...], as_json: bool) -> None:  # fmt: skip
    """Jobs with hpcserve's tag, GPUs, nodes, reason and wait time; GPU% and IDLE for your jobs where the
    service has GPU telemetry (an admin: every job). Needs no site config."""
    from hpcserve.cli.ps_telemetry import annotate, fetched, start
    from hpcserve.slurm.cli_backend import CliSlurmClient
    from hpcserve.slurm.protocol import JobFilter

    pending = start()  # the service's GPU figures, on a thread (none without a service socket)
    filt = JobFilter(
        user=current_user() if me else user, states=states, partitions=partitions, job_ids=job_ids
    )
    jobs = list(CliSlurmClient(ctx.runner).iter_jobs(filt))  # squeue runs while the rest loads
    jobs = annotate(jobs, fetched(pending))
    if as_json:
        from hpcserve.inventory import jobs_json

        gc.disable()  # a short-lived process building 10,000 records: the cycle collector only costs time
        sys.stdout.buffer.write(jobs_json(jobs) + b"\n")
        return
    _print_jobs(jobs)


def _print_jobs(jobs: list[Job]) -> None:
    from hpcserve.cli.output import emit_table, human_seconds
    from hpcserve.hostlists import collect

    rows = [(j.id, j.name, j.user, j.partition, j.state.value, j.gpus, j.num_nodes, collect(j.nodes),
             j.tag, j.reason, human_seconds(j.wait_s), _gpu_pct(j), "IDLE" if j.idle else "")
            for j in jobs]  # fmt: skip
    cols = ("JOBID", "NAME", "USER", "PARTITION", "STATE", "GPUS", "N", "NODES", "TAG", "REASON", "WAIT",
            "GPU%", "IDLE")  # fmt: skip
    emit_table(f"{len(jobs)} jobs", cols, rows)


def _gpu_pct(job: Job) -> str:
    return "" if job.gpu_util_pct is None else f"{job.gpu_util_pct:.0f}%"


@cli.command()
@click.argument("job_ids", nargs=-1, required=True)
@click.option("-s", "--signal", help="Send this signal (e.g. USR2) instead of ending the job.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@pass_ctx
def cancel(ctx: Context, job_ids: tuple[str, ...], signal: str | None, as_json: bool) -> None:
    """Cancel jobs (scancel), or signal them with --signal."""
    from hpcserve.slurm.cli_backend import CliSlurmClient

    CliSlurmClient(ctx.runner).cancel(job_ids, signal=signal)
    verb = f"signalled {signal}" if signal else "cancelled"
    if as_json:
        from hpcserve.cli.output import emit_json

        emit_json({"job_ids": list(job_ids), "action": verb})
    else:
        click.echo(f"{verb}: {' '.join(job_ids)}")


def main(argv: list[str] | None = None, runner: SubprocessRunner | None = None) -> None:
    """Run the CLI. Errors print one line on stderr, with no traceback, and exit non-zero. With
    ``_HPCSERVE_COMPLETE`` set, answer the shell's completion request instead (what ``cli.main()`` would do:
    this function builds the context itself, so it asks click's completion first)."""
    instruction = os.environ.get(COMPLETE_VAR)
    if instruction:
        from click.shell_completion import shell_complete

        sys.exit(shell_complete(cli, {}, "hpcserve", COMPLETE_VAR, instruction))
    try:
        with cli.make_context("hpcserve", list(sys.argv[1:] if argv is None else argv)) as ctx:
            ctx.meta["hpcserve.runner"] = runner
            cli.invoke(ctx)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()} (see {_command_path(exc)} --help)", err=True)
        sys.exit(exc.exit_code)
    except HpcserveError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug: still one line, with a way to get the traceback
        if os.environ.get("HPCSERVE_DEBUG"):
            raise
        click.echo(f"error: internal error {type(exc).__name__}: {exc} (rerun with HPCSERVE_DEBUG=1 "
                   "for the traceback, and report it)", err=True)  # fmt: skip
        sys.exit(70)


def _command_path(exc: click.ClickException) -> str:
    ctx = getattr(exc, "ctx", None)
    return ctx.command_path if isinstance(ctx, click.Context) else "hpcserve"
