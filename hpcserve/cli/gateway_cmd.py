"""``hpcserve gateway``: one stable OpenAI-compatible endpoint in front of every deployment's replicas."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from aiohttp import web

    from hpcserve.cli.main import Context
    from hpcserve.serving.gateway import ApiKey, GatewayConfig

GATEWAY_HELP = """Run the gateway: /v1/chat/completions, /v1/completions and /v1/models for every deployment,
routed to its ready replicas (least outstanding requests), SSE streamed through, API keys with token-rate
limits, requests buffered while a deployment scales from zero. /health and /metrics need no key.

The keys file holds sha256 hashes of the keys (make one with `echo -n KEY | hpcserve gateway --hash-key`);
the routes file lists deployments and their ready replicas and is re-read when it changes. Both formats
are in hpcserve/serving/gateway/keys.py and routes.py.
"""

file_option = click.Path(dir_okay=False, path_type=Path)


@click.command("gateway", help=GATEWAY_HELP, short_help="Run the OpenAI-compatible gateway.")
@click.pass_obj
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to bind.")  # noqa: S104
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to bind.")
@click.option("--keys", "keys_path", type=file_option, help="API keys file (YAML or JSON).")
@click.option(
    "--routes", "routes_path", type=file_option, help="Routes file: deployments and ready replicas."
)
@click.option(
    "--buffer-max",
    type=click.IntRange(0),
    default=256,
    show_default=True,
    help="Requests that may wait per deployment with no ready replica; more get 503.",
)
@click.option(
    "--buffer-timeout",
    type=click.FloatRange(0),
    default=120.0,
    show_default=True,
    help="Seconds a request waits for a replica before 503.",
)
@click.option(
    "--retry-after",
    type=click.IntRange(1),
    default=10,
    show_default=True,
    help="Retry-After seconds on 503 answers.",
)
@click.option(
    "--max-prompt-tokens", type=click.IntRange(1), help="Default prompt limit (estimated); larger get 413."
)
@click.option(
    "--max-tokens", type=click.IntRange(1), help="Default cap on max_tokens (requests are clamped)."
)
@click.option(
    "--chars-per-token",
    type=click.FloatRange(0.5),
    default=4.0,
    show_default=True,
    help="Prompt-size estimate: characters per token.",
)
@click.option(
    "--affinity-chars",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Prefix affinity on the first N prompt characters (0: off).",
)
@click.option(
    "--affinity-slack",
    type=click.IntRange(0),
    default=4,
    show_default=True,
    help="Requests the preferred replica may have beyond the least busy one.",
)
@click.option(
    "--connections",
    type=click.IntRange(1),
    default=8192,
    show_default=True,
    help="Connections kept to replicas, in all.",
)
@click.option(
    "--read-timeout",
    type=click.FloatRange(1),
    default=600.0,
    show_default=True,
    help="Longest silence from a replica, in seconds, before 504 or a stream error.",
)
@click.option(
    "--hash-key",
    "print_hash",
    is_flag=True,
    help="Print the sha256 of the key read from stdin, for the keys file; exit.",
)
def gateway(
    ctx: Context,
    /,
    host: str, port: int, keys_path: Path | None, routes_path: Path | None, buffer_max: int,
    buffer_timeout: float, retry_after: int, max_prompt_tokens: int | None, max_tokens: int | None,
    chars_per_token: float, affinity_chars: int, affinity_slack: int, connections: int, read_timeout: float,
    print_hash: bool,
) -> None:  # fmt: skip
    import logging

    from hpcserve.serving.gateway import GatewayConfig, hash_key, load_keys, make_app, routes_from_file
    from hpcserve.serving.gateway.serve import run_gateway

    if print_hash:
        click.echo(hash_key(sys.stdin.read().strip()))
        return
    if keys_path is None:
        raise click.UsageError("give --keys FILE (the format is in `hpcserve gateway --help`)")
    config = GatewayConfig(
        buffer_max=buffer_max, buffer_timeout_s=buffer_timeout, retry_after_s=retry_after,
        max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, chars_per_token=chars_per_token,
        affinity_chars=affinity_chars, affinity_slack=affinity_slack, upstream_connections=connections,
        read_timeout_s=read_timeout,
    )  # fmt: skip
    keys = load_keys(keys_path)  # HpcserveError: one line from main
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if routes_path is not None:
        app, origin = make_app(config, routes_from_file(routes_path), keys=keys), str(routes_path)
    else:
        app, origin = _app_on_database(ctx, config, keys)
    click.echo(f"hpcserve gateway on http://{host}:{port} ({len(keys)} keys, routes from {origin})", err=True)
    run_gateway(app, host, port)


def _app_on_database(
    ctx: Context, config: GatewayConfig, keys: Sequence[ApiKey]
) -> tuple[web.Application, str]:
    """Routes from hpcserve's database (the replicas the service marked ready); the gateway's buffered
    requests and per-key usage go back into it."""
    from hpcserve.serving.gateway import make_app
    from hpcserve.serving.gateway_store import report_to_store, routes_from_store, usage_to_store

    site = ctx.require_site()
    store = ctx.store(site)
    app = make_app(config, routes_from_store(store), keys=keys, report=report_to_store(store),
                   usage_sink=usage_to_store(store))  # fmt: skip
    return app, f"the database of site {site.name}"
