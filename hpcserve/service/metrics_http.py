"""The service's admin HTTP server: /metrics (prometheus_client's WSGI app) and a few JSON routes beside it
(Prometheus's HTTP service discovery), in a daemon thread, one thread per request as prometheus_client's
own ``start_http_server`` does. Listens on the address it is given only (the site's admin address)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No line per scrape on stderr."""


def routed(metrics: WsgiApp, routes: Mapping[str, Callable[[], object]]) -> WsgiApp:
    """``metrics`` for every path but those of ``routes``, which answer their callable's value as JSON."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        route = routes.get(environ.get("PATH_INFO", ""))
        if route is None:
            return metrics(environ, start_response)
        body = json.dumps(route()).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return app


def serve_metrics(
    addr: str, port: int, metrics: WsgiApp, routes: Mapping[str, Callable[[], object]]
) -> WSGIServer:
    """Listen on ``addr:port`` (IPv4 or IPv6, as ``addr`` is) and serve in a daemon thread; OSError when the
    port is taken."""
    family, _, _, _, sockaddr = socket.getaddrinfo(
        addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(_Server):
        address_family = family

    server = make_server(str(sockaddr[0]), port, routed(metrics, routes), Server, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
