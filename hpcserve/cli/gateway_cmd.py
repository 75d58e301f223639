"""``hpcserve gateway``: one stable OpenAI-compatible endpoint in front of every deployment's replicas."""

from __future__ import annotations

import socket
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
limits, requests buffered while a deployment scales from zero.

By default keys and routes come from the site's database (run it as the service account): keys made with
`hpcserve keys create` (new and revoked keys take effect within seconds), each reaching its owner's
deployments and those shared with the owner. /metrics is served on --metrics-listen only, never on the
public port.

For tests and standalone use, --keys FILE holds sha256 hashes of keys (make one with
`echo -n KEY | hpcserve gateway --hash-key`) and --routes FILE lists deployments and their ready replicas
(re-read when it changes). Both formats are in hpcserve/serving/gateway/keys.py and routes.py.
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
    "--metrics-listen",
    default="127.0.0.1:9465",
    show_default=True,
    help="HOST:PORT of /metrics and the detailed /health (an admin address; 'off': none).",
)
@click.option(
    "--max-upstream-body",
    type=click.IntRange(1024),
    default=16 * 1024 * 1024,
    show_default=True,
    help="Bytes of a non-streamed replica answer; larger ones get 502.",
)
@click.option(
    "--client-body-timeout",
    type=click.FloatRange(0.1),
    default=30.0,
    show_default=True,
    help="Seconds a client has to send its whole request body; slower ones get 408.",
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
    metrics_listen: str, max_upstream_body: int, client_body_timeout: float, print_hash: bool,
) -> None:  # fmt: skip
    import logging

    from hpcserve.serving.gateway import GatewayConfig, hash_key
    from hpcserve.serving.gateway.serve import run_gateway

    if print_hash:
        click.echo(hash_key(sys.stdin.read().strip()))
        return
    if routes_path is not None and keys_path is None:
        raise click.UsageError(
            "--routes FILE needs --keys FILE (or give neither: both from the site's database)"
        )
    admin = _admin_address(metrics_listen)
    config = GatewayConfig(
        buffer_max=buffer_max, buffer_timeout_s=buffer_timeout, retry_after_s=retry_after,
        max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, chars_per_token=chars_per_token,
        affinity_chars=affinity_chars, affinity_slack=affinity_slack, upstream_connections=connections,
        read_timeout_s=read_timeout, max_upstream_body_bytes=max_upstream_body,
        client_body_timeout_s=client_body_timeout,
    )  # fmt: skip
    keys = _file_keys(keys_path)  # HpcserveError: one line from main
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app, origin = _app(ctx, config, keys, routes_path, f"{socket.gethostname()}:{port}")
    metrics = f"/metrics on http://{admin[0]}:{admin[1]}" if admin else "no /metrics"
    click.echo(f"hpcserve gateway on http://{host}:{port} ({origin}; {metrics})", err=True)
    run_gateway(app, host, port, admin)


def _admin_address(value: str) -> tuple[str, int] | None:
    if value.lower() in ("off", "none", ""):
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:9465) or 'off'",
                                 param_hint="--metrics-listen")  # fmt: skip
    return host.strip("[]"), int(port)


def _file_keys(path: Path | None) -> tuple[list[ApiKey], dict[str, frozenset[str]]] | None:
    from hpcserve.serving.gateway import load_keys
    from hpcserve.serving.gateway_store import owner_groups

    if path is None:
        return None
    keys = load_keys(path)
    return keys, owner_groups({k.owner for k in keys})


def _app(
    ctx: Context, config: GatewayConfig, keys: tuple[Sequence[ApiKey], dict[str, frozenset[str]]] | None,
    routes_path: Path | None, source: str,
) -> tuple[web.Application, str]:  # fmt: skip
    """Routes from the routes file or hpcserve's database (the replicas the service marked ready); keys
    from the keys file or the database; the gateway's buffered requests and per-key usage go back into
    the database when it is used."""
    from hpcserve.serving.gateway import make_app, routes_from_file
    from hpcserve.serving.gateway_store import (
        keys_from_store,
        report_to_store,
        routes_from_store,
        usage_to_store,
    )

    if routes_path is not None:
        assert keys is not None
        return make_app(config, routes_from_file(routes_path), keys=keys[0], groups=keys[1]), (
            f"{len(keys[0])} keys, routes from {routes_path}"
        )
    site = ctx.require_site()
    store = ctx.store(site)
    report, usage_sink = report_to_store(store, source), usage_to_store(store)
    where = f"the database of site {site.name}"
    if keys is not None:
        app = make_app(config, routes_from_store(store), keys=keys[0], groups=keys[1], report=report,
                       usage_sink=usage_sink)  # fmt: skip
        return app, f"{len(keys[0])} keys from the keys file, routes from {where}"
    app = make_app(config, routes_from_store(store), key_source=keys_from_store(store, source), report=report,
                   usage_sink=usage_sink)  # fmt: skip
    return app, f"keys and routes from {where}"
