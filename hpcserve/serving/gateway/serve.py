"""Running the gateway app as a server: uvloop when installed, enough file descriptors for thousands of
streams (two sockets each), a deep accept backlog, no access log (it would cost more than the proxying)."""

from __future__ import annotations

import asyncio
import gc
import logging
import resource

from aiohttp import web

log = logging.getLogger(__name__)
BACKLOG = 4096
GC_THRESHOLD = 20_000  # allocations between young-generation collections (Python's default: 700)


def raise_open_files_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
        return hard
    return soft


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed (~15% less gateway CPU per request), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_gateway(app: web.Application, host: str, port: int) -> None:
    """Serve ``app`` until SIGINT or SIGTERM (then requests in flight get ``shutdown_timeout`` to end).

    ``handler_cancellation``: a client that goes away cancels its request, and the gateway closes the
    replica's connection, so the replica stops generating for nobody. Run the app with it elsewhere too.
    """
    files = raise_open_files_limit()
    if files < 8192:
        log.warning("only %d open files allowed: about %d concurrent streams at most", files, files // 2)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    gc.freeze()  # what was loaded at start is never garbage: spare the collector scanning it
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    web.run_app(
        app,
        handler_cancellation=True,
        host=host,
        port=port,
        access_log=None,
        backlog=BACKLOG,
        shutdown_timeout=30.0,
        loop=loop,
    )
