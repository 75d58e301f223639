"""Residency tiers: the pure decision, the spec's rules for tiers and pools, the pool spec, and the store's
tier and pool rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from hpcserve.errors import ValidationError
from hpcserve.serving.pools import as_replica_spec, is_pool, pool_of, pool_spec, shape_problem
from hpcserve.serving.spec import DeploymentSpec, build_deployment
from hpcserve.serving.tiers import Tier, TierWindows, decide_tier
from hpcserve.store import HistoryStore
from hpcserve.store.errors import NotOwner

T0 = datetime(2026, 1, 1, tzinfo=UTC)
WINDOWS = TierWindows(warm_after_s=60, cold_after_s=600, off_after_s=3600)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("idle", "tier"),
    [(0, Tier.HOT), (59, Tier.HOT), (60, Tier.WARM), (599, Tier.WARM), (600, Tier.COLD), (3600, Tier.OFF)],
)
def test_down_the_tiers_after_each_idle_window(idle: float, tier: Tier) -> None:
    decision = decide_tier(WINDOWS, Tier.HOT, T0, at(idle))
    assert decision.tier is tier
    assert decision.changed == (tier is not Tier.HOT)


def test_any_demand_or_the_floor_brings_it_hot() -> None:
    for current in Tier:
        assert decide_tier(WINDOWS, current, T0, at(5000), demand=True).tier is Tier.HOT
        floor = decide_tier(WINDOWS, current, T0, at(5000), floor=1)
        assert floor.tier is Tier.HOT and "forecast floor" in floor.reason
        assert floor.woken_by_floor == (current is not Tier.HOT)


def test_a_window_not_set_skips_its_tier() -> None:
    no_warm = TierWindows(cold_after_s=600)
    assert decide_tier(no_warm, Tier.HOT, T0, at(300)).tier is Tier.HOT
    assert decide_tier(no_warm, Tier.HOT, T0, at(700)).tier is Tier.COLD
    assert decide_tier(no_warm, Tier.COLD, T0, at(99999)).tier is Tier.COLD  # no off window
    never_cold = TierWindows(warm_after_s=60)
    assert decide_tier(never_cold, Tier.HOT, T0, at(99999)).tier is Tier.WARM


def test_no_traffic_seen_keeps_the_tier() -> None:
    decision = decide_tier(WINDOWS, Tier.WARM, None, at(10))
    assert decision.tier is Tier.WARM and not decision.changed


def test_windows_from_a_spec() -> None:
    spec = DeploymentSpec(name="m", model="org/m", served_model_name="m", warm_after_s=30, idle_to_zero_s=300,
                          off_after_s=900)  # fmt: skip
    assert TierWindows.of(spec) == TierWindows(30, 300, 900)
    kept = DeploymentSpec(name="m", model="org/m", served_model_name="m", warm_after_s=30, min_replicas=1)
    assert TierWindows.of(kept) == TierWindows(30, None, None)  # never cold, never off
    assert Tier.of(None) is Tier.HOT and Tier.of("warm") is Tier.WARM
    assert Tier.WARM.has_jobs and not Tier.COLD.has_jobs


@pytest.mark.parametrize(
    ("values", "flag", "fix"),
    [
        ({"warm_after_s": 600, "idle_to_zero_s": 600}, "--warm-after-s", "set warm_after_s below 600"),
        ({"off_after_s": 100, "idle_to_zero_s": 600}, "--off-after-s", "set off_after_s above 600"),
        ({"off_after_s": 900, "min_replicas": 1}, "--off-after-s", "drop off_after_s"),
        ({"pool_max_awake": 2}, "--pool-max-awake", "add --pool NAME"),
        ({"pool": "p", "pool_max_awake": 0}, "--pool-max-awake", ""),
        (
            {"warm_after_s": 30, "nodes_per_replica": 2},
            "--warm-after-s",
            "set nodes_per_replica: 1, or drop warm_after_s",
        ),
        ({"pool": "p", "nodes_per_replica": 2}, "--pool: sleep mode runs on one node", "or drop pool"),
    ],
)
def test_spec_rules_name_the_field_and_the_fix(values: dict[str, object], flag: str, fix: str) -> None:
    with pytest.raises(ValidationError) as err:
        build_deployment({"name": "m", "model": "org/m", **values})
    message = str(err.value)
    assert message.startswith(flag) and fix in message and "\n" not in message


def test_good_tier_and_pool_specs_pass() -> None:
    build_deployment({"name": "m", "model": "org/m", "warm_after_s": 30, "idle_to_zero_s": 60,
                      "off_after_s": 120})  # fmt: skip
    build_deployment({"name": "m", "model": "org/m", "warm_after_s": 30, "idle_to_zero_s": 0})  # never cold
    build_deployment({"name": "m", "model": "org/m", "pool": "p", "pool_max_awake": 2})
    build_deployment({"name": "m", "model": "org/m", "nodes_per_replica": 2})  # vLLM over nodes, no sleep
    build_deployment(
        {"name": "m", "model": "org/m", "engine": "simulator", "pool": "p", "nodes_per_replica": 2}
    )


def _member(name: str, **extra: object) -> dict[str, object]:
    spec = build_deployment(
        {"name": name, "model": f"org/{name}", "engine": "simulator", "pool": "p", **extra}
    )
    return spec.model_dump(mode="json")


def test_pool_spec_from_members() -> None:
    a = _member("a", pool_max_awake=2, max_replicas=1, warm_after_s=10, idle_to_zero_s=100)
    b = _member("b", max_replicas=3, idle_to_zero_s=50)
    spec = pool_spec("p", [a, b])
    assert is_pool(spec) and not is_pool(a)
    assert pool_of(a) == "p" and pool_of(spec) is None
    assert spec["max_awake"] == 2 and spec["max_replicas"] == 3 and spec["idle_to_zero_s"] == 100
    assert spec["warm_after_s"] == 10 and spec["off_after_s"] is None and spec["engine"] == "simulator"
    shape = DeploymentSpec.model_validate(as_replica_spec(spec))
    assert (shape.name, shape.pool, shape.pool_max_awake, shape.max_replicas) == ("p", "p", 2, 3)


def test_a_member_of_another_shape_is_refused_with_the_fix() -> None:
    spec = pool_spec("p", [_member("a")])
    assert shape_problem(spec, _member("b")) is None
    problem = shape_problem(spec, _member("c", gpus_per_replica=2))
    assert problem is not None and problem.startswith("gpus_per_replica: pool 'p' runs gpus_per_replica 1")
    assert "fix: give --gpus-per-replica 1" in problem


@pytest.fixture
def store(tmp_path: object) -> HistoryStore:
    s = HistoryStore(f"sqlite:///{tmp_path}/h.db", clock=lambda: T0)
    s.upgrade()
    return s


def test_store_keeps_the_tier(store: HistoryStore) -> None:
    store.create_deployment("m", "alice", _member("m"), 0)
    store.set_tier("m", "warm", at(5))
    found = store.get_deployment("m")
    assert found is not None and found.tier == "warm" and found.tier_since == at(5)
    with pytest.raises(ValidationError):
        store.set_tier("m", "lukewarm", at(6))


def test_store_pool_rows_follow_their_members(store: HistoryStore) -> None:
    store.join_pool("a", "alice", _member("a", pool_max_awake=2), "p", pool_spec)
    store.join_pool("b", "alice", _member("b"), "p", pool_spec)
    pool = store.get_deployment("p")
    assert pool is not None and is_pool(pool.spec) and pool.owner == "alice" and pool.spec["max_awake"] == 2
    with pytest.raises(NotOwner):
        store.join_pool("c", "bob", _member("c"), "p", pool_spec)
    assert store.get_deployment("c") is None  # refused as a whole
    store.leave_pool("a", "p", pool_spec, user="alice")
    pool = store.get_deployment("p")
    assert pool is not None and pool.spec["max_awake"] == 1 and not pool.deleted
    store.leave_pool("b", "p", pool_spec, user="alice")
    assert store.get_deployment("p") is None  # no replicas: gone at once
    with pytest.raises(ValidationError):
        store.create_deployment("d", "alice", _member("d"), 0)
        store.join_pool("e", "alice", _member("e"), "d", pool_spec)
