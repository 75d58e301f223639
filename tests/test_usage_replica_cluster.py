"""``hpcserve usage`` and a real replica: alice serves the engine simulator through the service (as in
test_replicas_as_owner), it idles, then serves two long requests through a real gateway with her key. Her
usage shows the replica's job as inference of her deployment, with GPU-seconds that served nothing (idle
engine samples), some that served (busy samples) and some unobserved (before it was ready); the tokens
the answers reported, and the cost per million of them; bob sees none of it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.api_fixtures import free_port
from tests.conftest import wait_until
from tests.service_fixtures import terminate
from tests.test_replicas_as_owner import Served, served  # noqa: F401 (fixture)

pytestmark = pytest.mark.cluster
IDLE_S = 12  # the replica idles this long after it is ready, before the requests
BUSY_TOKENS = 400  # x 0.01 s per token (the simulator's default): about 4 s of decoding per request


def usage_as(served: Served, user: str, *args: str) -> dict[str, Any]:  # noqa: F811
    done = served.service.run_as(user, "usage", "--json", "--jobs", "--since", "15m", *args)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@pytest.fixture
def gateway(served: Served) -> Iterator[str]:  # noqa: F811
    """A real gateway reading keys and routes from the service's database; its address."""
    port = free_port()
    argv = [sys.executable, "-m", "hpcserve", "gateway", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-listen", f"127.0.0.1:{free_port()}"]  # fmt: skip
    log = served.service.root / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=served.service.env)
    try:
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}/health"), timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        terminate([proc])


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


class Client:
    """alice's requests through the gateway; the usage each answer reported."""

    def __init__(self, url: str, key: str, model: str) -> None:
        self.url, self.key, self.model = url, key, model
        self.usage: list[dict[str, int]] = []

    def ask(self, max_tokens: int) -> bool:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens,
        }
        answer = httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=60,
                            headers={"Authorization": f"Bearer {self.key}"})  # fmt: skip
        if answer.status_code == 200:
            self.usage.append(answer.json()["usage"])
        return answer.status_code == 200

    def busy(self) -> None:
        """Two long requests at once."""
        threads = [threading.Thread(target=self.ask, args=(BUSY_TOKENS,)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

    def tokens(self) -> int:
        return sum(u["prompt_tokens"] + u["completion_tokens"] for u in self.usage)


def test_replica_gpu_hours_that_served_nothing_and_cost_per_token(served: Served, gateway: str) -> None:  # noqa: F811
    made = served.service.run_as("alice", "keys", "create", "--json")
    assert made.returncode == 0, made.stderr
    client = Client(gateway, json.loads(made.stdout)["key"], served.name)
    wait_until(lambda: client.ask(1), timeout=30)  # the gateway has read her key and the route
    if served.replica.ready_at is not None:
        time.sleep(max(0.0, IDLE_S - (time.time() - served.replica.ready_at.timestamp())))
    started = time.monotonic()
    client.busy()
    busy_s = time.monotonic() - started
    assert len(client.usage) == 3

    def flushed() -> bool:  # the gateway hands its counters to the store every ~10 s
        groups = usage_as(served, "alice", "--by", "deployment")["groups"]
        return any(g["group"] == served.name and g["requests"] == 3 for g in groups)

    wait_until(flushed, timeout=40, interval=1.0)
    report = usage_as(served, "alice", "--by", "deployment")
    (job,) = [j for j in report["jobs"] if j["job_id"] == served.replica.job_id]
    assert (job["kind"], job["deployment"], job["user"], job["gpus"]) == (
        "inference",
        served.name,
        "alice",
        1,
    )
    group = next(g for g in report["groups"] if g["group"] == served.name)
    inference_s = group["inference_gpu_hours"] * 3600
    nothing_s = group["served_nothing_gpu_hours"] * 3600
    unobserved_s = group["unobserved_replica_gpu_hours"] * 3600
    served_s = inference_s - nothing_s - unobserved_s
    assert nothing_s >= IDLE_S - 2, group  # idle samples after ready
    assert busy_s - 2 <= served_s <= busy_s + 2, (busy_s, group)  # samples with requests running
    assert unobserved_s > 0, group  # submit to ready: no engine samples yet
    assert group["training_gpu_hours"] == 0 and group["unknown_util_gpu_hours"] == group["gpu_hours"]
    assert group["tokens"] == client.tokens() > 2 * BUSY_TOKENS
    assert group["cost"] == pytest.approx(job["cost"]) and group["cost"] > 0
    assert group["cost_per_million_tokens"] == pytest.approx(group["cost"] / group["tokens"] * 1e6, rel=1e-3)

    bob = usage_as(served, "bob", "--by", "deployment")
    assert served.replica.job_id not in {j["job_id"] for j in bob["jobs"]}
    assert served.name not in {g["group"] for g in bob["groups"]}
    everyone = usage_as(served, "carol", "--by", "deployment", "--hpcserve-only")
    assert served.replica.job_id in {j["job_id"] for j in everyone["jobs"] if j["hpcserve"]}
