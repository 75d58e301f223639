"""``serve``, ``deployments``, ``scale``, ``share``, ``rm`` and ``logs``: models served as Slurm jobs behind
the gateway, through the service's API.

These commands never open the database and never run the serving controller: they ask ``hpcserve
service`` (its Unix socket, or TCP with munge from another login node), which knows the caller from the
kernel or munge, checks ownership and the owner's limits against its own config, and stores the desired
state; its controller submits the replicas. ``serve --wait`` only polls until a replica is ready. A
user's ``--site`` only tells this CLI where the service is.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import click

if TYPE_CHECKING:
    from hpcserve.cli.main import Context
    from hpcserve.service.client import ServiceClient

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
        ("--warm-after", "--warm-after-s", "warm_after_s"),
        {"type": float, "help": "Idle s before engines sleep."},
    ),
    (
        ("--off-after", "--off-after-s", "off_after_s"),
        {"type": float, "help": "Idle s before nothing is staged."},
    ),
    (("--pool",), {"help": "Join model pool NAME: its replica jobs run one engine per member."}),
    (("--pool-max-awake",), {"type": click.IntRange(1), "help": "Pool engines awake at once per replica."}),
    (("--gpu-fraction",), {"type": float, "help": "Part of one GPU (0-1): GPU shards, its memory share."}),
    (("--mig-profile",), {"help": "A MIG slice of one GPU instead, e.g. 1g.10gb."}),
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


def service_client(ctx: Context) -> ServiceClient:
    """The service's client: $HPCSERVE_SOCKET, else the site config's ``service`` section (the default
    socket when no site config is given)."""
    from hpcserve.service.client import ServiceClient

    return ServiceClient.for_site(ctx.load_site())


def deployment_path(name: str, *rest: str) -> str:
    return "/".join(["/v1/deployments", quote(name, safe=""), *rest])


@click.command()
@click.argument("model", required=False)
@spec_flags
@click.option("--account", help="Slurm account the replicas are charged to (default: your default account).")
@click.option("--share-with", "share_with", multiple=True, metavar="USER|@GROUP|all",
              help="Who else may reach it with their API keys (repeatable).")  # fmt: skip
@click.option("--wait/--no-wait", default=False, help="Wait until a replica is ready, showing progress.")
@click.option("--timeout", type=float, default=900.0, show_default=True, help="Seconds --wait waits.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.pass_obj
def serve(ctx: Context, /, model: str | None, spec_file: Path | None, engine_args: tuple[str, ...],
          account: str | None, share_with: tuple[str, ...], wait: bool, timeout: float, as_json: bool,
          **flags: Any) -> None:  # fmt: skip
    """Serve MODEL (a path or hub id) as Slurm jobs behind the gateway, autoscaled on queue depth."""
    from hpcserve.serving.spec import load_deployment

    base = load_deployment(spec_file).model_dump(mode="json") if spec_file else None
    if model and not flags.get("name") and base is None:
        flags["name"] = _name_from(model)
    values = {**flags, "model": model, "engine_args": _engine_args(engine_args), "account": account,
              "shares": list(share_with) or None}  # fmt: skip
    client = service_client(ctx)
    row = client.call("POST", "/v1/deployments", {"values": values, "base": base})
    if wait:
        row = _wait_ready(client, str(row["name"]), timeout, as_json)
    _print_rows([row], as_json)


def _name_from(model: str) -> str:
    """``meta-llama/Llama-3.1-8B-Instruct`` -> ``llama-3-1-8b-instruct``: DNS-safe, from the last part."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", model.rstrip("/").rsplit("/", 1)[-1].lower()).strip("-")[:63] or "model"


def _wait_ready(client: ServiceClient, name: str, timeout: float, quiet: bool) -> dict[str, Any]:
    """Poll the service until the deployment has a ready replica (the service's controller starts it)."""
    from rich.console import Console

    from hpcserve.errors import HpcserveError

    end = time.monotonic() + timeout
    console = Console(stderr=True, quiet=quiet)
    with console.status(f"{name}: waiting for the first ready replica") as status:
        while time.monotonic() < end:
            row: dict[str, Any] = client.call("GET", deployment_path(name))
            if row["ready"]:
                return row
            status.update(f"{name}: " + (", ".join(f"replica {r['index']} {r['state']} (job {r['job_id']})"
                                                  for r in row["replicas"]) or "no replica yet"))  # fmt: skip
            time.sleep(1.0)
    raise HpcserveError(f"{name}: no replica ready after {timeout:g}s (see: hpcserve logs {name})")


def _print_rows(rows: list[dict[str, Any]], as_json: bool) -> None:
    from hpcserve.cli.output import emit_json, emit_table

    if as_json:
        emit_json(rows)
        return
    table = [(r["name"], r["owner"], _model_cell(r), r["engine"], r.get("tier") or "hot",
              f"{r['ready']}/{r['desired']}" + (f" (capped: {r['capped']})" if r.get("capped") else ""),
              r["starting"], r["queue_depth"], r["endpoint"] + (" (deleting)" if r["deleting"] else ""))
             for r in rows]  # fmt: skip
    cols = ("DEPLOYMENT", "OWNER", "MODEL", "ENGINE", "TIER", "READY/DESIRED", "STARTING", "QUEUE",
            "ENDPOINT")  # fmt: skip
    emit_table(f"{len(rows)} deployments", cols, table)


def _model_cell(row: dict[str, Any]) -> str:
    """The served model; a pool's members (``pool: a, b``); a member's pool beside its model."""
    if row.get("kind") == "pool":
        return f"pool: {', '.join(row.get('members') or [])}"
    pool = row.get("pool")
    return str(row["served_model_name"]) + (f" (pool {pool})" if pool else "")


@click.command()
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.option("-v", "--verbose", is_flag=True, help="Also each replica's start, phase by phase.")
@click.pass_obj
def deployments(ctx: Context, /, as_json: bool, verbose: bool) -> None:
    """Deployments: owner, model (a pool's members), tier, replicas ready/desired and starting, queue depth,
    endpoint URL; with --verbose, how each replica's start went (queue wait, staging, engine load, first
    healthy answer, first token)."""
    rows = service_client(ctx).call("GET", "/v1/deployments")
    _print_rows(rows, as_json)
    if verbose and not as_json:
        _print_phases(rows)


def _print_phases(rows: list[dict[str, Any]]) -> None:
    """One line per replica: ``chat/0 job 42 ready: queue 1.2s, staging warm-valid 0.0s, ...``."""
    from hpcserve.errors import ValidationError
    from hpcserve.serving.phases import StartPhases

    for row in rows:
        for replica in row.get("replicas") or []:
            try:
                phases = StartPhases.from_json(replica["phases"]).summary() if replica.get("phases") else None
            except ValidationError:
                phases = None
            where = f"{row['name']}/{replica['index']} job {replica.get('job_id') or '-'} {replica['state']}"
            click.echo(f"{where}: {phases or 'no phases recorded yet'}")


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
    body = {"replicas": replicas, "min_replicas": min_replicas, "max_replicas": max_replicas}
    _print_rows([service_client(ctx).call("PATCH", deployment_path(name), body)], as_json)


@click.command()
@click.argument("name")
@click.argument("who", nargs=-1, metavar="[USER|@GROUP|all]...")
@click.option("--none", "unshare", is_flag=True, help="Share with nobody (only your own keys reach it).")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.pass_obj
def share(ctx: Context, /, name: str, who: tuple[str, ...], unshare: bool, as_json: bool) -> None:
    """Set who else may reach deployment NAME with their API keys (replaces the list)."""
    from hpcserve.errors import ValidationError

    if bool(who) == unshare:
        raise ValidationError("share: give USER, @GROUP or all (one or more), or --none")
    row = service_client(ctx).call("POST", deployment_path(name, "share"), {"shares": list(who)})
    if as_json:
        _print_rows([row], True)
        return
    click.echo(f"{name}: shared with {', '.join(row['shares'])}" if row["shares"] else f"{name}: not shared")


@click.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.pass_obj
def rm(ctx: Context, /, name: str, as_json: bool) -> None:
    """Remove a deployment: its replicas drain, then their jobs are cancelled."""
    answer = service_client(ctx).call("DELETE", deployment_path(name))
    if as_json:
        from hpcserve.cli.output import emit_json

        emit_json(answer)
        return
    click.echo(
        f"{name}: removed" if answer["removed"] else f"{name}: replicas draining; removed once they stop"
    )


@click.command()
@click.argument("name")
@click.option("-r", "--replica", "index", type=click.IntRange(0), help="Only this replica (default: all).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing as the logs grow.")
@click.option("--json", "as_json", is_flag=True, help="Print each new chunk as a line of JSON.")
@click.pass_obj
def logs(ctx: Context, /, name: str, index: int | None, follow: bool, as_json: bool) -> None:
    """Print the logs of a deployment's replica jobs (their engines' output); yours, or any as an admin."""
    from hpcserve.errors import HpcserveError

    client, offsets = service_client(ctx), dict[str, int]()
    while True:
        files = _fetch_logs(client, name, index, offsets)
        if not offsets and not files and not follow:
            raise HpcserveError(f"{name}: no replica logs yet (see: hpcserve deployments)")
        prefix = len({f["name"] for f in files} | set(offsets)) > 1
        for f in files:
            _print_chunk(f, prefix, as_json)
            offsets[f["name"]] = f["offset"]
        if any(f["more"] for f in files):
            continue
        if not follow:
            return
        time.sleep(0.5)


def _fetch_logs(
    client: ServiceClient, name: str, index: int | None, offsets: dict[str, int]
) -> list[dict[str, Any]]:
    from urllib.parse import urlencode

    query = [("replica", str(index))] if index is not None else []
    query += [("offset", f"{file}:{offset}") for file, offset in offsets.items()]
    path = deployment_path(name, "logs") + ("?" + urlencode(query) if query else "")
    files: list[dict[str, Any]] = client.call("GET", path)["files"]
    return files


def _print_chunk(chunk: dict[str, Any], prefix: bool, as_json: bool) -> None:
    if as_json:
        from hpcserve.cli.output import emit_json

        if chunk["data"]:
            emit_json(chunk)
        return
    for line in chunk["data"].splitlines():
        click.echo(f"{chunk['name']}: {line}" if prefix else line)
