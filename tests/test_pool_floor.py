"""A pool's awake floor (hpcserve.serving.pools.awake_floor): ceil(members requested in the last window /
K) jobs, held at its largest value over the scale-down window, never above max_replicas, 0 once no member
was requested within the window; its rule from the pool's spec; which members the controller counts as
requested (hpcserve.serving.residency.members_seen); its state kept in the database (AwakeFloors)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpcserve.serving.pools import (
    DEFAULT_USE_WINDOW_S,
    AwakeRule,
    AwakeState,
    as_replica_spec,
    awake_floor,
    pool_spec,
)
from hpcserve.serving.residency import AWAKE_FLOOR_PREFIX, AwakeFloors, members_seen
from hpcserve.serving.spec import DeploymentSpec, build_deployment
from hpcserve.store import Deployment, HistoryStore, Replica

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
RULE = AwakeRule(max_awake=2, use_window_s=600.0, hold_s=300.0, max_replicas=4)
MEMBERS = ("a", "b", "c", "d", "e")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def seen(asked: dict[str, float], members: tuple[str, ...] = MEMBERS) -> dict[str, datetime | None]:
    """Every member, with a request seen this tick at ``asked[name]`` seconds (None: not asked)."""
    return {name: at(asked[name]) if name in asked else None for name in members}


def run(ticks: list[tuple[float, dict[str, float]]], rule: AwakeRule = RULE) -> list[int]:
    """The floor at each (time, requests seen then) tick, the state carried from one to the next."""
    state, floors = AwakeState(), []
    for now, asked in ticks:
        floor, state = awake_floor(rule, seen(asked), state, at(now))
        floors.append(floor)
    return floors


def test_models_in_use_over_time_ask_for_ceil_of_them_over_k_jobs() -> None:
    # one model in use: 1 job; two: still 1 (K = 2); three: 2; five: 3
    ticks = [(0.0, {"a": 0.0}), (10.0, {"b": 9.0}), (20.0, {"c": 20.0}), (30.0, {"d": 30.0, "e": 30.0})]
    assert run(ticks) == [1, 1, 2, 3]


def test_no_request_ever_seen_asks_for_nothing() -> None:
    assert run([(0.0, {}), (10.0, {})]) == [0, 0]


def test_the_floor_is_held_at_its_largest_value_over_the_scale_down_window() -> None:
    # a, b, c asked at 0 s: 2 jobs. a asked again and again; b and c leave the window at 600 s, so the
    # count of models in use falls to 1 (1 job), but 2 is held for hold_s (300 s) after it last was 2
    # (the tick at 599 s)
    ticks = [(0.0, {"a": 0.0, "b": 0.0, "c": 0.0}), (300.0, {"a": 300.0}), (599.0, {"a": 599.0}),
             (600.0, {"a": 600.0}), (898.0, {"a": 898.0}), (899.0, {"a": 899.0})]  # fmt: skip
    assert run(ticks) == [2, 2, 2, 2, 2, 1]


def test_a_model_back_within_the_hold_raises_it_again_without_a_dip() -> None:
    # b and c out of the window at 600 s, back at 700 s: 2 held in between, so no job drained and started
    ticks = [(0.0, {"a": 0.0, "b": 0.0, "c": 0.0}), (599.0, {}), (650.0, {"a": 650.0}),
             (700.0, {"b": 700.0, "c": 700.0})]  # fmt: skip
    assert run(ticks) == [2, 2, 2, 2]


def test_it_is_zero_once_no_model_was_asked_within_the_window() -> None:
    # the pool then scales to zero as any idle deployment does: the hold does not keep it
    assert run([(0.0, {"a": 0.0, "b": 0.0, "c": 0.0}), (599.0, {}), (600.0, {})]) == [2, 2, 0]


def test_never_above_max_replicas() -> None:
    rule = AwakeRule(max_awake=1, use_window_s=600.0, hold_s=300.0, max_replicas=3)
    floors = run([(0.0, dict.fromkeys(MEMBERS, 0.0)), (10.0, {})], rule)
    assert floors == [3, 3]


def test_a_member_that_left_the_pool_is_forgotten() -> None:
    floor, state = awake_floor(RULE, seen({"a": 0.0, "b": 0.0, "c": 0.0}), AwakeState(), T0)
    assert floor == 2
    floor, state = awake_floor(RULE, seen({}, members=("a", "b")), state, at(200.0))  # c left
    assert set(state.last_request) == {"a", "b"} and floor == 2  # 1 now, 2 still held
    assert awake_floor(RULE, seen({}, members=("a", "b")), state, at(300.0))[0] == 1  # the hold is over


def test_the_newest_request_wins_and_old_ones_leave_the_state() -> None:
    _, state = awake_floor(RULE, seen({"a": 50.0}), AwakeState(), at(60.0))
    _, state = awake_floor(RULE, {"a": at(10.0)}, state, at(70.0))  # an older stamp (another gateway)
    assert state.last_request == {"a": at(50.0)}
    _, state = awake_floor(RULE, {"a": None}, state, at(700.0))
    assert state.last_request == {}  # bounded: only the members in use are kept


@given(st.lists(st.tuples(st.integers(1, 400), st.sets(st.sampled_from(MEMBERS))), max_size=30),
       st.integers(1, 4), st.integers(1, 5))  # fmt: skip
def test_the_floor_covers_the_models_in_use_and_stays_within_max_replicas(
    ticks: list[tuple[int, set[str]]], k: int, most: int
) -> None:
    rule = AwakeRule(max_awake=k, use_window_s=600.0, hold_s=300.0, max_replicas=most)
    state, now = AwakeState(), 0.0
    last: dict[str, float] = {}
    for gap, asked in ticks:
        now += gap
        last |= dict.fromkeys(asked, now)
        floor, state = awake_floor(rule, seen(dict.fromkeys(asked, now)), state, at(now))
        in_use = sum(1 for t in last.values() if now - t < 600.0)
        assert min(math.ceil(in_use / k), most) <= floor <= most
        assert floor == 0 or in_use > 0


def _pool(idle_to_zero_s: float, **extra: object) -> DeploymentSpec:
    members = [
        build_deployment({"name": n, "model": f"org/{n}", "engine": "simulator", "pool": "p",
                          "pool_max_awake": 2, "idle_to_zero_s": idle_to_zero_s, **extra}).model_dump()
        for n in ("a", "b")
    ]  # fmt: skip
    return DeploymentSpec.model_validate(as_replica_spec(pool_spec("p", members)))


def test_the_rule_comes_from_the_pool_spec() -> None:
    assert AwakeRule.of(_pool(900.0, max_replicas=3, scale_down_window_s=120.0)) == AwakeRule(
        2, 900.0, 120.0, 3
    )
    never = _pool(0.0)  # never scales to zero: the default window
    assert AwakeRule.of(never).use_window_s == DEFAULT_USE_WINDOW_S


# --- what the controller counts as a request ---------------------------------------------------------------


def member(name: str, served: str | None = None) -> Deployment:
    spec = {"name": name, "pool": "p", "served_model_name": served or name}
    return Deployment(name, "alice", spec, 1, 0, T0, T0, None, served_model_name=served or name)


def replica(index: int, ready_at: datetime | None) -> Replica:
    return Replica("p", index, 1, f"60{index}", "ready", "http://n1:7000", "n1", 7000, T0, ready_at, T0)


def engine(state: str, used: datetime | None) -> dict[str, object]:
    return {"port": 9000, "state": state, "last_used": used.timestamp() if used else 0}


def test_members_seen_from_the_gateway_and_the_agents_last_used() -> None:
    members = [member("a"), member("b", served="b-served"), member("c"), member("d")]
    replicas = [replica(0, at(-100.0)), replica(1, at(-10.0))]
    engines = {
        0: {"a": engine("awake", at(-50.0)), "b-served": engine("asleep", at(-20.0)),
            "c": engine("asleep", at(-200.0))},  # c: its start's stamp, before the replica was ready
        1: {"a": engine("awake", at(-5.0)), "c": engine("waking", None), "d": engine("awake", at(-30.0))},
    }  # fmt: skip
    gateway = {"d": at(-1.0)}
    found = members_seen(members, replicas, engines, gateway, T0)
    # a: its newest use on either replica; b: by its served name; c: waking now (a gateway holds a
    # request for it); d: the gateway's sample is newer than the start stamp (ignored) on replica 1
    assert found == {"a": at(-5.0), "b": at(-20.0), "c": T0, "d": at(-1.0)}
    assert members_seen([member("e")], replicas, engines, {}, T0) == {"e": None}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HistoryStore]:
    with HistoryStore(f"sqlite:///{tmp_path}/h.db", admins=["root"]) as s:
        s.upgrade()
        yield s


def test_the_state_is_kept_in_the_database_for_the_next_tick_and_the_next_service(
    store: HistoryStore,
) -> None:
    spec = _pool(600.0, max_replicas=4)
    floors = AwakeFloors.load(store)
    assert floors.floor("p", spec, {"a": T0, "b": T0, "c": T0}, T0) == 2
    assert store.get_state(AWAKE_FLOOR_PREFIX + "p") is not None
    again = AwakeFloors.load(store)  # a restarted service: the three models are still in use
    assert again.states["p"] == floors.states["p"]
    assert again.floor("p", spec, {"a": None, "b": None, "c": None}, at(100.0)) == 2


def test_a_stored_state_that_no_longer_decodes_starts_afresh(store: HistoryStore) -> None:
    store.put_state(AWAKE_FLOOR_PREFIX + "p", {"last_request": "garbage"})
    assert AwakeFloors.load(store).states == {}
