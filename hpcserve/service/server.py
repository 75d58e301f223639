"""Serving the API: a world-connectable Unix socket, and optionally a TCP listener (munge), on an event
loop of their own in a background thread, beside the scheduler's jobs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from hpcserve.errors import HpcserveError
from hpcserve.service.http import Transport

log = logging.getLogger("hpcserve.api")
AppFactory = Callable[[Transport], web.Application]


class ApiServer:
    """The API on ``socket_path`` (and ``listen`` = "HOST:PORT" when given) until ``stop()``."""

    def __init__(self, make_app: AppFactory, socket_path: Path, listen: str | None = None) -> None:
        self.make_app, self.socket_path, self.listen = make_app, socket_path, listen
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runners: list[web.AppRunner] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hpcserve-api", daemon=True)

    def start(self, timeout_s: float = 30.0) -> None:
        """Bind and serve in the background; raise here when binding fails."""
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise HpcserveError(f"the API did not start within {timeout_s:g}s")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            asyncio.run_coroutine_threadsafe(self._cleanup(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._bind())
        except BaseException as exc:  # reported to start()
            self._error = exc if isinstance(exc, HpcserveError) else _bind_error(exc, self.socket_path)
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        loop.close()

    async def _bind(self) -> None:
        prepare_socket_path(self.socket_path)
        unix = web.AppRunner(self.make_app("unix"), access_log=None, handle_signals=False)
        await unix.setup()
        self._runners.append(unix)
        await web.UnixSite(unix, str(self.socket_path)).start()
        self.socket_path.chmod(0o666)  # anyone may connect: the kernel says who they are
        log.info("API on unix:%s", self.socket_path)
        if self.listen:
            host, _, port = self.listen.rpartition(":")
            tcp = web.AppRunner(self.make_app("tcp"), access_log=None, handle_signals=False)
            await tcp.setup()
            self._runners.append(tcp)
            await web.TCPSite(tcp, host.strip("[]"), int(port)).start()
            log.info("API on http://%s (munge credentials)", self.listen)

    async def _cleanup(self) -> None:
        for runner in self._runners:
            await runner.cleanup()


def prepare_socket_path(path: Path) -> None:
    """The socket's folder (made 0755 when missing); a stale socket left by a dead service is removed, a
    live one is an error (two services on one socket)."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_socket():
        raise HpcserveError(
            f"service.socket: {path} exists and is not a socket (fix: remove it or pick another)"
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe, contextlib.suppress(OSError):
        probe.connect(str(path))
        raise HpcserveError(f"service.socket: another service answers on {path} (fix: stop it first)")
    path.unlink()


def _bind_error(exc: BaseException, path: Path) -> HpcserveError:
    return HpcserveError(
        f"cannot serve the API on {path}: {exc} (fix: check service.socket and service.listen)"
    )
