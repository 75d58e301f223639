"""A replica is ready when its engine's /v1/models lists the served model (with the engine's key), not
merely when /health answers: a real HTTP server on loopback that starts serving the model late."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hpcserve.errors import HpcserveError
from hpcserve.serving.engine_proc import wait_healthy

KEY = "engine-key"


class Engine(BaseHTTPRequestHandler):
    serving_after = 0.0  # monotonic time from which /v1/models lists the model

    def do_GET(self) -> None:
        if self.path == "/health":
            self._answer(200, b"")
        elif self.path == "/v1/models" and self.headers.get("Authorization") != f"Bearer {KEY}":
            self._answer(401, b'{"error": "bad key"}')
        elif self.path == "/v1/models" and time.monotonic() >= Engine.serving_after:
            self._answer(200, json.dumps({"data": [{"id": "llm", "object": "model"}]}).encode())
        else:
            self._answer(200, b'{"data": []}')

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def engine() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Engine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def proc() -> Iterator[subprocess.Popen[bytes]]:
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield running
    running.kill()
    running.wait()


def test_ready_only_once_the_model_is_listed(engine: str, proc: subprocess.Popen[bytes]) -> None:
    Engine.serving_after = time.monotonic() + 1.5  # healthy at once, the model only 1.5 s later
    started = time.monotonic()
    wait_healthy(engine, proc, 20, "llm", KEY)
    assert time.monotonic() - started >= 1.5


def test_a_model_never_listed_or_a_wrong_key_is_not_ready(engine: str, proc: subprocess.Popen[bytes]) -> None:
    Engine.serving_after = 0.0
    with pytest.raises(HpcserveError, match="not ready"):
        wait_healthy(engine, proc, 1.5, "other-model", KEY)
    with pytest.raises(HpcserveError, match="not ready"):
        wait_healthy(engine, proc, 1.5, "llm", "wrong-key")
    wait_healthy(engine, proc, 5, "llm", KEY)


def test_slurms_time_limit_warning_ends_neither_the_replica_nor_its_engine() -> None:
    """Slurm sends USR2 before the time limit to every process of the step: submitit's handler would end the
    job, and USR2's default action would kill the engine. A replica ignores it, and so does the engine it
    starts (as the replica starts it: USR2 ignored before the spawn); the service hands it over instead."""
    code = (
        "import os, signal, subprocess, sys, time\n"
        "from hpcserve.serving.engine_proc import ignore_time_limit_warning\n"
        "signal.signal(signal.SIGUSR2, lambda *a: os._exit(3))  # what submitit's handler amounts to\n"
        "signal.signal(signal.SIGUSR2, signal.SIG_IGN)\n"
        "engine = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1.5)'])\n"
        "ignore_time_limit_warning()\n"
        "time.sleep(0.5)\n"
        "os.kill(engine.pid, signal.SIGUSR2)\n"
        "os.kill(os.getpid(), signal.SIGUSR2)\n"
        "time.sleep(0.1)\n"
        "print('still serving', engine.wait())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout == "still serving 0\n", done
    assert "time-limit warning (USR2) ignored" in done.stderr
