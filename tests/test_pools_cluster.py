"""Model pools on the real cluster: four engine-simulator models in one pool with ``pool_max_awake`` 2 run on
ONE replica job; requests alternating between the models are each answered, the least recently used model
is the one put to sleep, and at no poll are more than 2 engines holding the GPU; ``hpcserve deployments``
shows the pool with its members. Another user's pool is refused from their side (exit 77)."""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import httpx
import pytest

from hpcserve.store import Replica
from tests.api_fixtures import ApiService, api_service, short_root  # noqa: F401 (fixtures)
from tests.test_serving_cluster import Serving, chat, serve
from tests.tier_fixtures import (
    agent_engines,
    engine_url,
    is_sleeping,
    ready_replica,
    replicas,
    requests_while_asleep,
    tiers,  # noqa: F401 (fixture)
)

pytestmark = pytest.mark.cluster
MAX_AWAKE = 2
HOLDING = ("awake", "waking", "sleeping")  # an engine holds GPU memory until it is asleep


class AwakeWatch:
    """Polls the pool replica's agent and each engine's /is_sleeping in a thread; the most holding at once."""

    def __init__(self, replica: Replica, models: list[str]) -> None:
        self.replica, self.models = replica, models
        self.most_agent = self.most_engines = self.polls = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            try:
                engines = agent_engines(self.replica)
                awake = sum(not is_sleeping(engine_url(self.replica, m)) for m in self.models)
            except httpx.HTTPError:
                continue
            self.most_agent = max(self.most_agent, sum(e["state"] in HOLDING for e in engines.values()))
            self.most_engines = max(self.most_engines, awake)
            self.polls += 1

    def __enter__(self) -> AwakeWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def test_four_models_share_one_replica_job_at_most_two_awake(tiers: Serving) -> None:  # noqa: F811
    pool = tiers.name("pool")
    models = [tiers.name(f"m{i}") for i in range(4)]
    for model in models:
        serve(tiers, model, "--pool", pool, "--pool-max-awake", str(MAX_AWAKE), "--max-replicas", "1")
    row = tiers.deployment(pool)
    assert (row["kind"], row["members"], row["max_awake"]) == ("pool", models, MAX_AWAKE)
    assert all(tiers.deployment(m)["pool"] == pool for m in models)

    assert chat(tiers, models[0], timeout=240).status_code == 200  # from zero: the pool's replica starts
    replica = ready_replica(tiers, pool)
    assert replica.models is not None and sorted(replica.models) == sorted(models)
    with AwakeWatch(replica, models) as watch:
        for turn in range(2):
            for i, model in enumerate(models):
                answer = chat(tiers, model, timeout=60)
                assert answer.status_code == 200, answer.text
                engines = agent_engines(replica)
                assert engines[model]["state"] == "awake"
                if turn or i:  # two awake: the one before and this one; the one before that sleeps
                    before = models[i - 1]
                    assert engines[before]["state"] == "awake", engines
                    lru = models[i - 2]
                    assert engines[lru]["state"] == "asleep", (lru, engines)
    assert watch.polls > 10 and watch.most_agent <= MAX_AWAKE and watch.most_engines <= MAX_AWAKE
    assert all(requests_while_asleep(engine_url(replica, m)) == 0 for m in models)
    assert [r.deployment for r in replicas(tiers, pool)] == [pool]  # one replica job
    assert all(replicas(tiers, m) == [] for m in models)  # members have none of their own


def test_another_users_pool_is_refused_from_their_side(api_service: ApiService) -> None:  # noqa: F811
    def serve_as(user: str, name: str, pool: str) -> Any:
        return api_service.run_as(user, "serve", "sim-model", "--name", name, "--engine", "simulator",
                                  "--pool", pool, "--json")  # fmt: skip

    joined = serve_as("alice", "alice-m1", "alices-pool")
    assert joined.returncode == 0, joined.stderr
    refused = serve_as("bob", "bob-m1", "alices-pool")
    assert refused.returncode == 77, refused.stderr
    line = refused.stderr.strip()
    assert "\n" not in line and "belongs to alice, not bob" in line and "--pool" in line
    listed = json.loads(api_service.run_as("bob", "deployments", "--json").stdout)
    assert "bob-m1" not in {r["name"] for r in listed}
    pool_row = next(r for r in listed if r["name"] == "alices-pool")
    assert (pool_row["kind"], pool_row["owner"], pool_row["members"]) == ("pool", "alice", ["alice-m1"])
    table = api_service.run_as("bob", "deployments").stdout
    cells = [[c.strip() for c in re.split("[│┃]", row)] for row in table.splitlines()]
    header = next(c for c in cells if "TIER" in c)
    [pool_cells] = [dict(zip(header, c, strict=False)) for c in cells if len(c) > 1 and c[1] == "alices-pool"]
    assert (pool_cells["MODEL"], pool_cells["TIER"]) == ("pool: alice-m1", "hot")
    for argv in (("rm", "alice-m1"), ("rm", "alices-pool"), ("scale", "alice-m1", "--max", "3"),
                 ("scale", "alices-pool", "2")):  # fmt: skip
        other = api_service.run_as("bob", *argv)
        assert other.returncode == 77, (argv, other.returncode, other.stderr)
        assert "\n" not in other.stderr.strip() and "alice" in other.stderr, other.stderr
    kept = json.loads(api_service.run_as("alice", "deployments", "--json").stdout)
    pool_row = next(r for r in kept if r["name"] == "alices-pool")
    assert (pool_row["members"], pool_row["desired"]) == (["alice-m1"], 0), pool_row  # bob changed nothing
    removed = api_service.run_as("alice", "rm", "alice-m1")
    assert removed.returncode == 0, removed.stderr
    listed = json.loads(api_service.run_as("alice", "deployments", "--json").stdout)
    assert {"alice-m1", "alices-pool"}.isdisjoint({r["name"] for r in listed})  # the pool left with it
