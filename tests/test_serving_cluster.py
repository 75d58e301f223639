"""Serving on the real cluster: replicas of the engine simulator as Slurm jobs on the inference partition,
behind the real gateway, driven by the real service (controller + autoscaler), all as subprocesses."""

from __future__ import annotations

import csv
import json
import os
import secrets
import string
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from hpcserve.serving.gateway.keys import hash_key
from hpcserve.slurm.cli_backend import CliSlurmClient
from tests.conftest import POLICY, PREFIX, SITE, TRACES, wait_until
from tests.service_fixtures import terminate

pytestmark = pytest.mark.cluster
KEY = "sk-test-" + uuid.uuid4().hex
TRACE = TRACES / "azure_llm_2023_code.csv"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Serving:
    """A site config of its own (fast controller tick, own replica folder, database and API socket), a
    gateway and a service, and the CLI pointed at them (it reaches the service on that socket)."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.socket = root / "api.sock"
        self.env = {**os.environ, "HPCSERVE_SITE": str(root / "site.yaml"), "HPCSERVE_POLICY": str(POLICY),
                    "HPCSERVE_DATABASE_URL": f"sqlite:///{root / 'hpcserve.db'}",
                    "HPCSERVE_SOCKET": str(self.socket),
                    "SLURM_CONF": str(PREFIX / "etc" / "slurm.conf")}  # fmt: skip
        site = yaml.safe_load(SITE.read_text())
        site["serving"] = {"gateway_url": f"http://127.0.0.1:{self.port}", "controller_interval_s": 0.5,
                           "replica_dir": str(root / "replicas"), "ready_timeout_s": 120}  # fmt: skip
        site["service"] = {**(site.get("service") or {}), "socket": str(self.socket)}
        (root / "site.yaml").write_text(yaml.safe_dump(site))
        keys = {"keys": [{"id": "test", "owner": "root", "sha256": hash_key(KEY)}]}
        (root / "keys.yaml").write_text(yaml.safe_dump(keys))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.names: list[str] = []
        # letters only: the engine simulator reads a model size from the name ("...-1b3f..." was a 1B
        # model, "...-964b2a" one of 964B, whose modelled sleep and wake took tens of seconds)
        self.suffix = "".join(secrets.choice(string.ascii_lowercase) for _ in range(8))

    def name(self, base: str) -> str:
        """A deployment name of this test only (replica jobs are found by it at cleanup)."""
        self.names.append(f"{base}-{self.suffix}")
        return self.names[-1]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hpcserve", *args], capture_output=True, text=True,
                              env=self.env, timeout=300, check=False)  # fmt: skip

    def start(self, *args: str, log: str) -> None:
        out = (self.root / log).open("wb")
        self.procs.append(subprocess.Popen([sys.executable, "-m", "hpcserve", *args], env=self.env,
                                           stdout=out, stderr=subprocess.STDOUT))  # fmt: skip

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def deployment(self, name: str) -> dict[str, Any]:
        out = self.cli("deployments", "--json")
        assert out.returncode == 0, out.stderr
        return next(d for d in json.loads(out.stdout) if d["name"] == name)

    def stop(self) -> None:
        terminate(self.procs, timeout=20)


@pytest.fixture
def serving(slurm: CliSlurmClient) -> Iterator[Serving]:
    root = PREFIX / "jobs" / f"serving-{uuid.uuid4().hex[:8]}"  # every node and every user can reach it
    root.mkdir(parents=True)
    root.chmod(0o755)
    s = Serving(root)
    assert s.cli("db", "upgrade").returncode == 0
    s.start(
        "gateway",
        "--port",
        str(s.port),
        "--keys",
        str(root / "keys.yaml"),
        "--metrics-listen",
        "off",
        log="gateway.log",
    )
    s.start("service", "--rebalance-interval", "0", "--metrics-port", "0", log="service.log")
    wait_until(lambda: _up(s.url("/health")) and s.socket.exists(), timeout=30)
    yield s
    s.stop()
    tags = tuple(f"hpcserve:replica:{name}:" for name in s.names)
    leftovers = [j.id for j in slurm.jobs() if j.tag and j.tag.startswith(tags)]
    if leftovers:  # some may be ending already: scancel's complaint about those does not matter
        subprocess.run(["scancel", *leftovers], capture_output=True, check=False, timeout=60)


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def chat(
    s: Serving, model: str, stream: bool = False, max_tokens: int = 8, timeout: float = 120
) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello from the test"}],
            "max_tokens": max_tokens, "stream": stream}  # fmt: skip
    return httpx.post(s.url("/v1/chat/completions"), json=body, timeout=timeout,
                      headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip


def serve(s: Serving, name: str, *flags: str) -> dict[str, Any]:
    out = s.cli("serve", name, "--engine", "simulator", "--gpus-per-replica", "1", *flags, "--json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout)[0])


def test_serve_starts_gpu_replicas_behind_the_gateway(serving: Serving, slurm: CliSlurmClient) -> None:
    name = serving.name("tiny")
    got = serve(serving, name, "--min-replicas", "1", "--max-replicas", "2", "--wait", "--timeout", "120")
    assert got["ready"] == 1 and got["endpoint"] == serving.url("/v1")
    (replica,) = got["replicas"]
    (job,) = [j for j in slurm.jobs() if j.id == replica["job_id"]]
    assert job.partition == "infer" and job.gpus == 1 and job.tag == f"hpcserve:replica:{name}:0"

    plain = chat(serving, name)
    assert plain.status_code == 200, plain.text
    assert (
        plain.json()["choices"][0]["message"]["content"] and plain.json()["usage"]["completion_tokens"] == 8
    )
    streamed = chat(serving, name, stream=True)
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]"), streamed.text
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: {")]  # fmt: skip
    assert sum(bool(c["choices"] and c["choices"][0]["delta"].get("content")) for c in chunks) == 8


def test_another_user_cannot_scale_or_remove(serving: Serving) -> None:
    name = serving.name("mine")
    serve(serving, name, "--min-replicas", "0", "--max-replicas", "1")
    nobody = [
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        sys.executable,
        "-m",
        "hpcserve",
    ]
    env = {**serving.env, "USER": "root", "LOGNAME": "root", "HOME": str(serving.root)}  # a lie: ignored
    for args in (["scale", name, "1"], ["rm", name]):
        out = subprocess.run(
            [*nobody, *args], capture_output=True, text=True, env=env, timeout=120, check=False
        )
        assert out.returncode != 0 and "belongs to root, not nobody" in out.stderr, out.stderr
    assert serving.deployment(name)["owner"] == "root" and serving.deployment(name)["desired"] == 0


def spec_file(s: Serving, name: str, **fields: Any) -> str:
    spec = {"name": name, "model": "sim-model", "engine": "simulator", "gpus_per_replica": 1, **fields}
    path = s.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def burst_offsets(count: int, span_s: float) -> list[float]:
    """The arrival pattern of the busiest minute of the Azure code trace, squeezed into ``span_s``."""
    with TRACE.open() as f:
        times = [float(row["arrival_time_s"]) for row in csv.DictReader(f)]
    start = max(range(0, int(times[-1]) - 60, 10), key=lambda t: sum(t <= x < t + 60 for x in times))
    window = [x - start for x in times if start <= x < start + 60][:count]
    return [x * span_s / max(window[-1], 1e-9) for x in window]


def replica_count(s: Serving, name: str) -> int:
    d = s.deployment(name)
    return int(d["ready"]) + int(d["starting"])


def test_burst_scales_up_then_down_then_to_zero(serving: Serving) -> None:
    name = serving.name("burst")
    spec = spec_file(serving, name, min_replicas=0, max_replicas=3, target_waiting_per_replica=2,
                     scale_up_window_s=0, scale_down_window_s=6, idle_to_zero_s=16,
                     simulator={"decode_ms_per_token": 40, "max_num_seqs": 2})  # fmt: skip
    assert serving.cli("serve", "-f", spec).returncode == 0
    assert replica_count(serving, name) == 0

    first = time.monotonic()
    at_zero = chat(serving, name, max_tokens=4)  # buffered at the gateway until a replica is ready
    assert at_zero.status_code == 200, at_zero.text
    assert time.monotonic() - first > 0.3  # it really waited for a replica to start

    counts: list[int] = []
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            counts.append(replica_count(serving, name))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch)
    watcher.start()
    statuses: list[int] = []
    senders = [threading.Timer(t, lambda: statuses.append(chat(serving, name, max_tokens=20).status_code))
               for t in burst_offsets(48, 8.0)]  # fmt: skip
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    wait_until(lambda: len(statuses) == len(senders), timeout=180)
    wait_until(lambda: replica_count(serving, name) == 0, timeout=120, interval=1)
    watching.set()
    watcher.join()
    counts.append(replica_count(serving, name))  # the watcher may have last looked before the drop
    assert statuses == [200] * len(senders)
    peak = max(counts)
    after_peak = counts[counts.index(peak) :]
    assert peak >= 2, counts  # scaled up for the burst
    assert any(0 < c < peak for c in after_peak), counts  # down after the window, before zero
    assert after_peak[-1] == 0


def test_killed_replica_fails_the_stream_cleanly_and_is_replaced(
    serving: Serving, slurm: CliSlurmClient
) -> None:
    name = serving.name("kill")
    spec = spec_file(serving, name, min_replicas=1, max_replicas=1, simulator={"decode_ms_per_token": 50})
    assert serving.cli("serve", "-f", spec, "--wait", "--timeout", "120").returncode == 0
    (old,) = serving.deployment(name)["replicas"]
    body = {"model": name, "messages": [{"role": "user", "content": "a long answer"}], "max_tokens": 400,
            "stream": True}  # fmt: skip
    lines: list[str] = []
    with httpx.stream("POST", serving.url("/v1/chat/completions"), json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:  # fmt: skip
        assert response.status_code == 200
        for line in response.iter_lines():
            lines.append(line)
            if len(lines) == 3:
                killed = time.monotonic()
                slurm.cancel([old["job_id"]], signal="KILL")  # the job dies; no drain
        ended = time.monotonic()
    data = [line for line in lines if line.startswith("data: ")]
    assert ended - killed < 5, f"the stream ended {ended - killed:.1f} s after the kill"
    assert "error" in data[-1] and "[DONE]" not in data[-1], data[-3:]

    def replaced() -> bool:
        replicas = serving.deployment(name)["replicas"]
        return any(r["state"] == "ready" and r["job_id"] != old["job_id"] for r in replicas)

    wait_until(replaced, timeout=120, interval=1)
    assert chat(serving, name).status_code == 200
