"""GPU% and IDLE for ``hpcserve ps``: the service's ``GET /v1/telemetry/jobs``, fetched while squeue runs.

``ps --json`` is benchmarked against plain squeue (scripts/bench/cli_vs_squeue), so this path uses the
standard library and llhttp only (a raw request over the service's Unix socket: the kernel tells the
service who asks, so a user gets their own jobs' figures, an admin everyone's), and costs nothing when no
service socket is on this host: then ps shows no telemetry, silently. The request runs on a thread started
before squeue's output is read; ``ps`` waits at most ``TIMEOUT_S`` for it, and any failure (a service that
is down, slow or refuses) only leaves the columns empty.

The socket is ``$HPCSERVE_SOCKET``, else ``DEFAULT_SOCKET`` (the site config's default ``service.socket``:
``ps`` reads no config).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hpcserve.model.cluster import Job

SOCKET_ENV = "HPCSERVE_SOCKET"
DEFAULT_SOCKET = "/run/hpcserve/api.sock"  # = ServiceSettings().socket (a test checks they agree)
PATH = "/v1/telemetry/jobs"
TIMEOUT_S = 2.0
Telemetry = dict[str, tuple[float | None, bool]]  # job id -> (GPU utilisation %, flagged idle)


def socket_path() -> str | None:
    path = os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET
    return path if os.path.exists(path) else None  # noqa: PTH110 (no pathlib on ps's fast path)


class Fetch:
    """``GET /v1/telemetry/jobs`` on a daemon thread, started at once."""

    def __init__(self, path: str) -> None:
        import threading

        self.path = path
        self.found: Telemetry = {}
        self.thread = threading.Thread(target=self._run, name="ps-telemetry", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import contextlib

        with contextlib.suppress(Exception):  # any failure only leaves ps's columns empty
            self.found = fetch(self.path)

    def result(self) -> Telemetry:
        self.thread.join(TIMEOUT_S)
        return {} if self.thread.is_alive() else self.found


def start() -> Fetch | None:
    """The fetch, running; None when this host has no service socket."""
    path = socket_path()
    return Fetch(path) if path is not None else None


def fetch(path: str) -> Telemetry:
    """The service's answer as {job id: (util %, idle)}; {} for any answer but 200.

    A raw socket and llhttp (``httptools``, the gateway's parser): ``http.client`` would import ``ssl`` and
    ``email`` (60 ms here), which on a thread beside squeue's parsing slowed ``ps --json`` by a third."""
    import json
    import socket

    import httptools

    answer = _Answer()
    parser = httptools.HttpResponseParser(answer)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT_S)
        sock.connect(path)
        sock.sendall(REQUEST)
        while not answer.done and (data := sock.recv(65536)):
            parser.feed_data(data)
    if not answer.done or parser.get_status_code() != 200:
        return {}
    return parse(json.loads(b"".join(answer.body)))


REQUEST = f"GET {PATH} HTTP/1.1\r\nHost: hpcserve\r\nConnection: close\r\n\r\n".encode()


class _Answer:
    """httptools' callbacks: the body's parts, and whether the answer ended."""

    def __init__(self) -> None:
        self.body: list[bytes] = []
        self.done = False

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True


def parse(data: Any) -> Telemetry:
    rows = data.get("jobs", []) if isinstance(data, dict) else []
    found: Telemetry = {}
    for row in rows:
        util = row.get("util_pct")
        found[str(row["job_id"])] = (None if util is None else float(util), bool(row.get("idle")))
    return found


def annotate(jobs: list[Job], telemetry: Telemetry) -> list[Job]:
    """``jobs`` with ``gpu_util_pct`` and ``idle`` set where the service has figures for them (the same
    list, untouched, when it has none)."""
    if not telemetry:
        return jobs
    from msgspec.structs import replace

    return [job if (found := telemetry.get(job.id)) is None
            else replace(job, gpu_util_pct=found[0], idle=found[1]) for job in jobs]  # fmt: skip


def fetched(pending: Fetch | None) -> Telemetry:
    return pending.result() if pending is not None else {}
