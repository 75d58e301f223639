"""Residency tiers on the real cluster: an engine-simulator deployment with a short ``warm_after_s`` goes
hot -> warm after its idle window (the tier in ``hpcserve deployments --json``, its engine asleep, its job
kept); a request through the gateway then wakes it and is answered within the modelled wake time + 1 s,
and the engine never got a request while asleep."""

from __future__ import annotations

import time

import pytest

from hpcserve.enginesim.timing import wake_seconds, weights_gib
from tests.conftest import wait_until
from tests.test_serving_cluster import Serving, chat, serve
from tests.tier_fixtures import (
    SLEEP_SCALE,
    engine_url,
    is_sleeping,
    ready_replica,
    replicas,
    requests_while_asleep,
    tiers,  # noqa: F401 (fixture)
)

pytestmark = pytest.mark.cluster
WARM_AFTER_S = 6


def test_an_idle_deployment_goes_warm_and_a_request_wakes_it(tiers: Serving) -> None:  # noqa: F811
    name = tiers.name("warm")
    serve(tiers, name, "--min-replicas", "0", "--max-replicas", "1", "--warm-after", str(WARM_AFTER_S),
          "--idle-to-zero", "600")  # fmt: skip
    first = chat(tiers, name, timeout=180)
    assert first.status_code == 200, first.text  # from zero: starts the replica
    replica = ready_replica(tiers, name)
    engine = engine_url(replica, name)
    assert tiers.deployment(name)["tier"] == "hot" and not is_sleeping(engine)

    wait_until(lambda: tiers.deployment(name)["tier"] == "warm", timeout=WARM_AFTER_S + 30)
    wait_until(lambda: is_sleeping(engine), timeout=30)
    kept = replicas(tiers, name)
    assert [(r.state, r.job_id) for r in kept] == [("ready", replica.job_id)]  # the job is kept

    modelled = wake_seconds(1, weights_gib(name), scale=SLEEP_SCALE)
    started = time.monotonic()
    answer = chat(tiers, name, max_tokens=1, timeout=60)
    ttft = time.monotonic() - started  # the whole answer of one token: an upper bound on the TTFT
    assert answer.status_code == 200, answer.text
    print(f"warm -> answered: {ttft:.3f} s (modelled wake {modelled:.3f} s)")
    assert ttft < modelled + 1.0, (ttft, modelled)
    assert not is_sleeping(engine)
    assert requests_while_asleep(engine) == 0
    wait_until(lambda: tiers.deployment(name)["tier"] == "hot", timeout=10)
