"""``serve``, ``deployments``, ``scale``, ``rm`` and ``logs``: models served as Slurm jobs behind the gateway.

A deployment is stored with its owner (the calling Unix user); only the owner or a site admin may change
it. ``serve`` records the desired state and runs one controller tick at once, so the first replicas are
submitted without waiting for the service; ``--wait`` keeps ticking (under the leader lock, so a running
``hpcserve service`` and this command never both act) until a replica is ready.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from hpcserve.identity import current_user

if TYPE_CHECKING:
    from hpcserve.cli.main import Context
    from hpcserve.config import SiteConfig
    from hpcserve.store import Deployment, HistoryStore

JSON_HELP = "Print machine-readable JSON instead of text."
SPEC_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_SPEC_FLAGS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (("-f", "--file", "spec_file"), {"type": SPEC_FILE, "help": "Spec YAML; flags override its fields."}),
    (("--name",), {"help": "Deployment name (default: from the model)."}),
    (("--served-model-name",), {"help": "The model name clients ask for (default: the name)."}),
    (("--engine",), {"type": click.Choice(["vllm", "simulator"]), "help": "vllm, or hpcserve's simulator."}),
    (("--gpus-per-replica",), {"type": click.IntRange(0), "help": "Tensor parallel size (GPUs per node)."}),
    (("--nodes-per-replica",), {"type": click.IntRange(1), "help": "Pipeline parallel size (nodes)."}),
    (("--min-replicas",), {"type": click.IntRange(0), "help": "Never fewer (0: may scale to zero)."}),
    (("--max-replicas",), {"type": click.IntRange(1), "help": "Never more replicas."}),
    (("--target-waiting", "target_waiting_per_replica"), {"type": float, "help": "Waiting per replica."}),
    (("--scale-up-window", "scale_up_window_s"), {"type": float, "help": "Seconds of excess before up."}),
    (
        ("--scale-down-window", "scale_down_window_s"),
        {"type": float, "help": "Seconds of slack before down."},
    ),
    (("--idle-to-zero", "idle_to_zero_s"), {"type": float, "help": "Idle seconds before zero replicas."}),
    (
        ("--engine-arg", "engine_args"),
        {"multiple": True, "metavar": "FLAG=VALUE", "help": "An engine flag, e.g. max-model-len=8192."},
    ),
    (("--warm-tier",), {"help": "Node-local folder to stage the weights into first."}),
    (("-p", "--partition"), {"help": "Partition (default: the policy's inference class)."}),
    (("-t", "--time", "time_limit"), {"help": "Time limit of each replica job."}),
]


def spec_flags(func: Any) -> Any:
    for decls, options in reversed(_SPEC_FLAGS):
        func = click.option(*decls, **options)(func)
    return func


def _engine_args(pairs: tuple[str, ...]) -> dict[str, str] | None:
    from hpcserve.errors import ValidationError

    if not pairs:
        return None
    parsed = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not key:
            raise ValidationError(
                f"--engine-arg {pair!r}: expected FLAG=VALUE (fix: e.g. max-model-len=8192)"
            )
        parsed[key.removeprefix("--")] = value if eq else "true"
    return parsed


def _deployment_url(site: SiteConfig) -> str:
    return f"{site.serving.gateway_url}/v1"


@click.command()
@click.argument("model", required=False)
@spec_flags
@click.option("--wait/--no-wait", default=False, help="Wait until a replica is ready, showing progress.")
@click.option("--timeout", type=float, default=900.0, show_default=True, help="Seconds --wait waits.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.pass_obj
def serve(ctx: Context, /, model: str | None, spec_file: Path | None, engine_args: tuple[str, ...],
          wait: bool, timeout: float, as_json: bool, **flags: Any) -> None:  # fmt: skip
    """Serve MODEL (a path or hub id) as Slurm jobs behind the gateway, autoscaled on queue depth."""
    from hpcserve.jobs.policy import resolve
    from hpcserve.serving.launcher import replica_request
    from hpcserve.serving.spec import build_deployment, load_deployment
    from hpcserve.serving.wiring import make_controller, tick_as_leader

    site = ctx.require_site()
    policy = ctx.load_policy(site)
    base = load_deployment(spec_file) if spec_file else None
    if model and not flags.get("name") and base is None:
        flags["name"] = _name_from(model)
    values = {**flags, "model": model, "engine_args": _engine_args(engine_args)}
    spec = build_deployment(values, base)
    resolve(replica_request(spec, 0), policy)  # refuse what the policy refuses before anything is stored
    store = ctx.store(site)
    store.create_deployment(spec.name, current_user(), spec.model_dump(mode="json"), spec.min_replicas)
    controller = make_controller(site, policy, store)
    tick_as_leader(controller, store, ttl_s=30)
    if wait:
        _wait_ready(store, spec.name, timeout, lambda: tick_as_leader(controller, store, ttl_s=30), as_json)
    _print_deployments(site, store, [spec.name], as_json)


def _name_from(model: str) -> str:
    """``meta-llama/Llama-3.1-8B-Instruct`` -> ``llama-3-1-8b-instruct``: DNS-safe, from the last part."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", model.rstrip("/").rsplit("/", 1)[-1].lower()).strip("-")[:63] or "model"


def _wait_ready(store: HistoryStore, name: str, timeout: float, tick: Any, quiet: bool) -> None:
    from rich.console import Console

    from hpcserve.errors import HpcserveError

    end = time.monotonic() + timeout
    console = Console(stderr=True, quiet=quiet)
    with console.status(f"{name}: waiting for the first ready replica") as status:
        while time.monotonic() < end:
            tick()
            replicas = store.replicas(name)
            if any(r.state == "ready" for r in replicas):
                return
            status.update(f"{name}: " + (", ".join(f"replica {r.index} {r.state} (job {r.job_id})"
                                                  for r in replicas) or "no replica yet"))  # fmt: skip
            time.sleep(1.0)
    raise HpcserveError(f"{name}: no replica ready after {timeout:g}s (see: hpcserve logs {name})")


def _rows(site: SiteConfig, store: HistoryStore, deployment: Deployment) -> dict[str, Any]:
    replicas = store.replicas(deployment.name)
    spec = deployment.spec
    return {
        "name": deployment.name, "owner": deployment.owner, "model": spec.get("model"),
        "served_model_name": spec.get("served_model_name"), "engine": spec.get("engine"),
        "desired": deployment.desired_replicas,
        "ready": sum(r.state == "ready" for r in replicas),
        "starting": sum(r.state == "starting" for r in replicas),
        "draining": sum(r.state == "draining" for r in replicas),
        "queue_depth": _queue_depth(store, deployment.name),
        "endpoint": _deployment_url(site), "deleting": deployment.deleted,
        "replicas": [{"index": r.index, "state": r.state, "job_id": r.job_id, "url": r.url}
                     for r in replicas],
    }  # fmt: skip


def _queue_depth(store: HistoryStore, name: str) -> int:
    """Waiting requests at the latest samples: the engines' queues plus the gateway's buffer."""
    from datetime import UTC, datetime, timedelta

    latest: dict[int | None, Any] = {}
    for sample in store.engine_samples(name, since=datetime.now(UTC) - timedelta(seconds=30)):
        latest[sample.replica] = sample
    return sum((s.waiting or 0) + (s.gateway_waiting or 0) for s in latest.values())


def _print_deployments(site: SiteConfig, store: HistoryStore, names: list[str] | None, as_json: bool) -> None:
    from hpcserve.cli.output import emit_json, emit_table

    rows = [_rows(site, store, d) for d in store.list_deployments() if names is None or d.name in names]
    if as_json:
        emit_json(rows)
        return
    table = [(r["name"], r["owner"], r["served_model_name"], r["engine"], f"{r['ready']}/{r['desired']}",
              r["starting"], r["queue_depth"], r["endpoint"] + (" (deleting)" if r["deleting"] else ""))
             for r in rows]  # fmt: skip
    cols = ("DEPLOYMENT", "OWNER", "MODEL", "ENGINE", "READY/DESIRED", "STARTING", "QUEUE", "ENDPOINT")
    emit_table(f"{len(rows)} deployments", cols, table)


@click.command()
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.pass_obj
def deployments(ctx: Context, /, as_json: bool) -> None:
    """Deployments: owner, model, replicas ready/desired and starting, queue depth, endpoint URL."""
    site = ctx.require_site()
    _print_deployments(site, ctx.store(site), None, as_json)


@click.command()
@click.argument("name")
@click.argument("replicas", type=click.IntRange(0), required=False)
@click.option("--min", "min_replicas", type=click.IntRange(0), help="New minimum replicas.")
@click.option("--max", "max_replicas", type=click.IntRange(1), help="New maximum replicas.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.pass_obj
def scale(ctx: Context, /, name: str, replicas: int | None, min_replicas: int | None,
          max_replicas: int | None, as_json: bool) -> None:  # fmt: skip
    """Set a deployment's replicas now (the autoscaler may move it within min..max), or its bounds."""
    from hpcserve.serving.spec import build_deployment
    from hpcserve.store import NotFound

    site = ctx.require_site()
    store, user = ctx.store(site), current_user()
    deployment = store.get_deployment(name)
    if deployment is None:
        raise NotFound(f"no deployment {name!r} (see: hpcserve deployments)")
    if min_replicas is not None or max_replicas is not None:
        from hpcserve.serving.spec import DeploymentSpec

        base = DeploymentSpec.model_validate(deployment.spec)
        bounds = {"min_replicas": min_replicas, "max_replicas": max_replicas}
        store.update_spec(name, build_deployment(bounds, base).model_dump(mode="json"), user=user)
    if replicas is not None:
        store.set_desired(name, replicas, user=user)
    _print_deployments(site, store, [name], as_json)


@click.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.pass_obj
def rm(ctx: Context, /, name: str, as_json: bool) -> None:
    """Remove a deployment: its replicas drain, then their jobs are cancelled."""
    from hpcserve.store import NotFound

    site = ctx.require_site()
    store = ctx.store(site)
    if store.get_deployment(name) is None:
        raise NotFound(f"no deployment {name!r} (see: hpcserve deployments)")
    gone = store.delete_deployment(name, user=current_user())
    if as_json:
        from hpcserve.cli.output import emit_json

        emit_json({"name": name, "removed": gone, "draining": not gone})
        return
    click.echo(f"{name}: removed" if gone else f"{name}: replicas draining; removed once they stop")


@click.command()
@click.argument("name")
@click.option("-r", "--replica", "index", type=int, help="Only this replica (default: all).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing as the logs grow.")
@click.pass_obj
def logs(ctx: Context, /, name: str, index: int | None, follow: bool) -> None:
    """Print the logs of a deployment's replica jobs (their engines' output)."""
    from hpcserve.errors import HpcserveError

    site = ctx.require_site()
    store = ctx.store(site)
    replicas = [r for r in store.replicas(name) if index is None or r.index == index]
    files = [f for r in replicas if r.job_id for f in _log_files(site, name, r.job_id)]
    if not files:
        raise HpcserveError(f"{name}: no replica logs yet (see: hpcserve deployments)")
    offsets = dict.fromkeys(files, 0)
    while True:
        for path in files:
            offsets[path] = _print_new(path, offsets[path], len(files) > 1)
        if not follow:
            return
        time.sleep(0.5)


def _log_files(site: SiteConfig, name: str, job_id: str) -> list[Path]:
    folder = site.serving.replica_path() / name / job_id
    return sorted(folder.glob(f"{job_id}_*_log.*"))


def _print_new(path: Path, offset: int, prefix: bool) -> int:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return offset
    for line in data.decode(errors="replace").splitlines():
        click.echo(f"{path.name}: {line}" if prefix else line)
    return offset + len(data)
