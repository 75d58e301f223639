"""``hpcserve usage`` and a real replica: alice serves the engine simulator through the service (as in
test_replicas_as_owner), it idles, then serves two long requests. Her usage shows the replica's job as
inference of her deployment, with GPU-seconds that served nothing (idle engine samples), some that served
(busy samples) and some unobserved (before it was ready); bob sees none of it."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest

from tests.test_replicas_as_owner import Served, served  # noqa: F401 (fixture)

pytestmark = pytest.mark.cluster
IDLE_S = 12  # the replica idles this long after it is ready, before the requests
BUSY_TOKENS = 400  # x 0.01 s per token (the simulator's default): about 4 s of decoding per request


def usage_as(served: Served, user: str, *args: str) -> dict[str, Any]:  # noqa: F811
    done = served.service.run_as(user, "usage", "--json", "--jobs", "--since", "15m", *args)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def busy(served: Served) -> None:  # noqa: F811
    """Two long requests at once, straight to the engine with its key (no gateway needed)."""
    key = {"Authorization": f"Bearer {served.replica.engine_key}"}
    body = {"model": served.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": BUSY_TOKENS}

    def ask() -> None:
        answer = httpx.post(f"{served.replica.url}/v1/chat/completions", json=body, headers=key, timeout=60)
        assert answer.status_code == 200, answer.text

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)


def test_replica_gpu_hours_that_served_nothing(served: Served) -> None:  # noqa: F811
    if served.replica.ready_at is not None:
        time.sleep(max(0.0, IDLE_S - (time.time() - served.replica.ready_at.timestamp())))
    started = time.monotonic()
    busy(served)
    busy_s = time.monotonic() - started
    time.sleep(1.5)  # the controller's next samples, then the report
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

    bob = usage_as(served, "bob", "--by", "deployment")
    assert served.replica.job_id not in {j["job_id"] for j in bob["jobs"]}
    assert served.name not in {g["group"] for g in bob["groups"]}
    everyone = usage_as(served, "carol", "--by", "deployment", "--hpcserve-only")
    assert served.replica.job_id in {j["job_id"] for j in everyone["jobs"] if j["hpcserve"]}
