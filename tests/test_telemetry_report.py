"""The reporter end to end on one machine: the real pynvml reads the recorded NVML device, and the samples go
through hpcserve's service client over a Unix socket to a stand-in of the service's route, which answers as
the contract says (``POST /v1/telemetry`` -> 200 ``{"stored": n}``), or fails or refuses when told to. The
job side runs as it runs in jobs: ``hpcserve telemetry run`` (templates), ``WithTelemetry`` (callables) and
``ReplicaMain.report_telemetry`` (replicas), each in its own process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.nvml_fixtures import BUSY, IDLE, recorded_env, recorded_nvml

__all__ = ["recorded_nvml"]  # the fixture, used by name


class RouteStandIn:
    """``POST /v1/telemetry`` on a Unix socket, in a thread: keeps each body and its Authorization header;
    answers each call with the next of ``statuses`` (the last one repeats)."""

    def __init__(self, socket: Path, *statuses: int) -> None:
        self.socket, self.statuses = socket, list(statuses or (200,))
        self.calls: list[tuple[dict[str, Any], str]] = []
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.json()
        status = self.statuses[min(len(self.calls), len(self.statuses) - 1)]
        self.calls.append((body, request.headers.get("Authorization", "")))
        if status == 200:
            return web.json_response({"stored": len(body["samples"])})
        return web.json_response({"error": f"answer {status} for the test"}, status=status)

    def start(self) -> RouteStandIn:
        app = web.Application()
        app.router.add_post("/v1/telemetry", self._post)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.UnixSite(self._runner, str(self.socket)).start())
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)

    def samples(self) -> list[dict[str, Any]]:
        return [s for body, _ in self.calls for s in body["samples"]]


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "service.sock"


@pytest.fixture
def route(socket_path: Path) -> Iterator[RouteStandIn]:
    stand_in = RouteStandIn(socket_path).start()
    yield stand_in
    stand_in.stop()


def job_env(library: Path, recording: Path, socket: Path, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HPCSERVE_"))}
    return recorded_env(library, recording, base, HPCSERVE_SOCKET=str(socket), HPCSERVE_SITE="/nonexistent",
                        **extra)  # fmt: skip


def wait_until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def telemetry_run(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "hpcserve", "telemetry", "run", *args]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_template_reporter_sends_each_round_then_a_last_one_at_sigterm(
    recorded_nvml: Path, route: RouteStandIn, socket_path: Path
) -> None:
    proc = telemetry_run(job_env(recorded_nvml, BUSY, socket_path), "--job", "42", "--interval", "0.2")
    wait_until(lambda: len(route.calls) >= 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert err == ""  # nothing to say when all goes well
    bodies = [body for body, _ in route.calls]
    assert all(set(b) == {"job_id", "samples"} and b["job_id"] == "42" for b in bodies)  # not a replica
    assert all(auth == "" for _, auth in route.calls)  # the kernel says who calls (SO_PEERCRED)
    assert all([s["gpu_index"] for s in b["samples"]] == [0, 1, 2, 3] for b in bodies)
    assert all(
        s["util_pct"] >= 87 and s["power_w"] > 0 and s["sm_clock_mhz"] == 1980 for s in route.samples()
    )


def test_a_service_that_is_down_costs_one_line_and_no_samples(recorded_nvml: Path, socket_path: Path) -> None:
    proc = telemetry_run(job_env(recorded_nvml, IDLE, socket_path), "--job", "43", "--interval", "0.25")
    time.sleep(1.0)  # down: the first report fails, the next is due 2 s after it
    route = RouteStandIn(socket_path).start()
    try:
        wait_until(lambda: len(route.calls) >= 2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        route.stop()
    assert proc.returncode == 0
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert "cannot report to the service" in lines[0] and "retrying with back-off up to 300 s" in lines[0]
    assert lines[1].endswith("telemetry: reporting again after 1 failed tries")
    first = route.calls[0][0]["samples"]
    assert len(first) >= 4 * 6  # the samples taken while the service was down came with the first report
    stamps = [s["at"] for s in route.samples()]
    assert stamps == sorted(stamps)
    assert all(s["util_pct"] <= 8 for s in route.samples())


def test_a_refusal_ends_the_reporter_not_the_job(recorded_nvml: Path, socket_path: Path) -> None:
    route = RouteStandIn(socket_path, 403).start()
    try:
        proc = telemetry_run(job_env(recorded_nvml, BUSY, socket_path), "--job", "44", "--interval", "0.2")
        _, err = proc.communicate(timeout=20)  # ends by itself
    finally:
        route.stop()
    assert proc.returncode == 0 and len(route.calls) == 1
    assert err.strip().endswith(
        "telemetry: the service refused this job's samples (answer 403 for the test): reporting stops"
    )


def test_a_job_without_gpus_and_an_opted_out_job_report_nothing(
    recorded_nvml: Path, route: RouteStandIn, socket_path: Path
) -> None:
    cpu_job = job_env(recorded_nvml, BUSY, socket_path, SLURM_JOB_ID="45")
    done = subprocess.run([sys.executable, "-m", "hpcserve", "telemetry", "run", "--job", "45"], env=cpu_job,
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 0 and "job 45 has no GPUs" in done.stderr
    off = job_env(recorded_nvml, BUSY, socket_path, HPCSERVE_TELEMETRY="0")
    done = subprocess.run([sys.executable, "-m", "hpcserve", "telemetry", "run", "--job", "45"], env=off,
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 0 and "off (HPCSERVE_TELEMETRY=0)" in done.stderr
    assert route.calls == []


REPLICA = """
import sys, time
from pathlib import Path
from hpcserve.serving.replica import ReplicaCredentials, ReplicaMain
folder = Path(sys.argv[1])
(folder / "replica-1.secret").write_bytes(ReplicaCredentials("s3cret", "engine-key").encode())
main = ReplicaMain({}, 1, str(folder), 10.0, "replica-1.secret", sys.argv[2])
main.report_telemetry("chat")
time.sleep(1.5)
"""

CALLABLE = """
import sys
from hpcserve.telemetry.injob import WithTelemetry
print(WithTelemetry(sum)([1, 2, 3]))
"""


def test_a_replica_reports_with_its_secret_deployment_and_index(
    recorded_nvml: Path, route: RouteStandIn, socket_path: Path, tmp_path: Path
) -> None:
    env = job_env(recorded_nvml, BUSY, socket_path, SLURM_JOB_ID="46", CUDA_VISIBLE_DEVICES="1",
                  HPCSERVE_TELEMETRY_INTERVAL_S="0.2")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", REPLICA, str(tmp_path), str(socket_path)], env=env,
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(route.calls) >= 3
    for body, auth in route.calls:
        assert auth == "Replica s3cret"
        assert (body["job_id"], body["deployment"], body["index"]) == ("46", "chat", 1)
        assert [(s["gpu_index"], s["gpu_uuid"][-1]) for s in body["samples"]] == [(0, "1")]


def test_a_callable_reports_while_it_runs_and_returns_its_value(
    recorded_nvml: Path, route: RouteStandIn, socket_path: Path
) -> None:
    env = job_env(recorded_nvml, IDLE, socket_path, SLURM_JOB_ID="47", CUDA_VISIBLE_DEVICES="0,1",
                  HPCSERVE_TELEMETRY_INTERVAL_S="60")  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", CALLABLE], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "6"
    # a round when it starts, the last one when it ends
    assert [(b["job_id"], len(b["samples"])) for b, _ in route.calls] == [("47", 2), ("47", 2)]
    assert json.dumps(route.calls[0][0]).count("GPU-") == 2
