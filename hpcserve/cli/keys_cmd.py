"""``hpcserve keys create|list|revoke|usage``: gateway API keys, made and read through the
service (the CLI never opens the database). A key is printed once, when it is made."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from hpcserve.cli.main import JSON_HELP

if TYPE_CHECKING:
    from hpcserve.cli.main import Context


def _call(ctx: Context, method: str, path: str, body: Any = None) -> Any:
    from hpcserve.service.client import ServiceClient

    return ServiceClient.for_site(ctx.load_site()).call(method, path, body)


def _models(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [m.strip() for m in value.split(",") if m.strip()]
    if not names:
        raise click.BadParameter("give model names, comma-separated (e.g. llama-8b,qwen-7b)")
    return names


@click.group(short_help="Make, list and revoke gateway API keys.")
def keys() -> None:
    """Gateway API keys: each reaches your deployments and those shared with you (narrowed by --models).
    The service keeps only a salted HMAC of a key: it is shown once, when made."""


@keys.command("create")
@click.option("--name", default="", help="A label to recognise the key by.")
@click.option("--models", help="Only these models (served model names, comma-separated).")
@click.option(
    "--rate", type=click.FloatRange(min=0, min_open=True), help="Tokens per second (default: no limit)."
)
@click.option(
    "--burst", type=click.FloatRange(min=0, min_open=True), help="Bucket size in tokens (60 s of rate)."
)
@click.option("--max-tokens", type=click.IntRange(1), help="Cap on each request's max_tokens.")
@click.option(
    "--priority",
    type=click.Choice(["interactive", "batch"]),
    help="batch: waits behind interactive requests and is shed first when overloaded [interactive].",
)
@click.option(
    "--allow-fallback",
    is_flag=True,
    help="An overloaded deployment may answer with its fallback deployment's model.",
)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.pass_obj
def create(ctx: Context, /, name: str, models: str | None, rate: float | None, burst: float | None,
           max_tokens: int | None, priority: str | None, allow_fallback: bool,
           as_json: bool) -> None:  # fmt: skip
    """Make a key; it is printed once (store it now: the service cannot show it again)."""
    body = {
        "name": name or None,
        "models": _models(models),
        "rate": rate,
        "burst": burst,
        "max_tokens": max_tokens,
        "priority": priority,
        "allow_fallback": allow_fallback or None,
    }
    made = _call(ctx, "POST", "/v1/keys", {k: v for k, v in body.items() if v is not None})
    if as_json:
        from hpcserve.cli.output import emit_json

        emit_json(made)
        return
    click.echo(made["key"])
    click.echo(
        f"key {made['id']} made; it is shown only now (revoke: hpcserve keys revoke {made['id']})", err=True
    )


@keys.command("list")
@click.option("--all", "everyone", is_flag=True, help="Every user's keys (admins).")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.pass_obj
def list_keys(ctx: Context, /, everyone: bool, as_json: bool) -> None:
    """Your keys (never the keys themselves): id, label, models, limits, when made or revoked."""
    from hpcserve.cli.output import emit_json, emit_table

    found = _call(ctx, "GET", "/v1/keys" + ("?all=1" if everyone else ""))
    if as_json:
        emit_json(found)
        return
    rows = [(k["id"], k["owner"], k["name"], ",".join(k["models"] or ["(all)"]), k["rate"], k["burst"],
             k["max_tokens"], k.get("priority", "interactive"), "yes" if k.get("allow_fallback") else "no",
             k["created_at"][:19], (k["revoked_at"] or "")[:19]) for k in found]  # fmt: skip
    cols = ("ID", "OWNER", "NAME", "MODELS", "RATE", "BURST", "MAX TOKENS", "PRIORITY", "FALLBACK", "CREATED",
            "REVOKED")  # fmt: skip
    emit_table(f"{len(found)} keys", cols, rows)


@keys.command("revoke")
@click.argument("key_id")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.pass_obj
def revoke(ctx: Context, /, key_id: str, as_json: bool) -> None:
    """Revoke a key: the gateway refuses it within seconds."""
    from urllib.parse import quote

    done = _call(ctx, "DELETE", f"/v1/keys/{quote(key_id, safe='')}")
    if as_json:
        from hpcserve.cli.output import emit_json

        emit_json(done)
        return
    click.echo(f"key {done['id']} revoked")


@keys.command("usage", short_help="Requests and tokens per day of your keys.")
@click.option("--since", "since_days", type=click.FloatRange(0), help="Only the last DAYS days.")
@click.option("--all", "everyone", is_flag=True, help="Every user's keys (admins).")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.pass_obj
def usage(ctx: Context, /, since_days: float | None, everyone: bool, as_json: bool) -> None:
    """Requests and tokens per day, key and model, of your keys (GPU-hours and cost: hpcserve usage)."""
    from urllib.parse import urlencode

    from hpcserve.cli.output import emit_json, emit_table

    query = {k: v for k, v in (("since", since_days), ("all", 1 if everyone else None)) if v is not None}
    rows = _call(ctx, "GET", "/v1/keys/usage" + (f"?{urlencode(query)}" if query else ""))
    if as_json:
        emit_json(rows)
        return
    table = [(r["day"], r["key_id"], r["model"], r["requests"], r["prompt_tokens"], r["completion_tokens"])
             for r in rows]  # fmt: skip
    emit_table(f"{len(rows)} usage rows", ("DAY", "KEY", "MODEL", "REQUESTS", "PROMPT", "COMPLETION"), table)
