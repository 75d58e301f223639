"""Warm tiers and model pools in the gateway, as pure functions: the routes the store gives a sleep-capable
replica and a pool's members, and the choice of the replica that serves (or wakes) a model."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hpcserve.serving.gateway.routes import Endpoint, parse_routes
from hpcserve.serving.gateway.wake_choice import AgentView, EngineView, Serve, Wake, choose, endpoint_port
from hpcserve.serving.gateway_store import routes_from_store, served_routes
from hpcserve.serving.pools import pool_spec
from hpcserve.serving.spec import build_deployment
from hpcserve.store import Deployment, HistoryStore, Replica

AT = datetime(2026, 1, 1, tzinfo=UTC)


def _dep(name: str, spec: dict[str, Any], tier: str | None = None, owner: str = "alice") -> Deployment:
    return Deployment(name, owner, spec, 1, 0, AT, AT, None, spec.get("served_model_name", name), None,
                      ["bob"], tier)  # fmt: skip


def _replica(
    deployment: str, index: int, port: int, models: dict[str, int] | None = None, state: str = "ready"
) -> Replica:
    host = f"node{index}"
    return Replica(deployment, index, 1, f"{index}", state, f"http://{host}:{port}", host, port, AT, AT, AT,
                   engine_key=f"key{index}", models=models)  # fmt: skip


def test_a_pool_members_route_to_the_engines_of_the_pool_replicas_woken_through_their_agents() -> None:
    pool = _dep("p", {"kind": "pool", "name": "p", "max_awake": 1})
    small = _dep("small", {"pool": "p", "served_model_name": "small-m"}, tier="warm")
    tiny = _dep("tiny", {"pool": "p"}, owner="alice")
    replicas = {
        "p": [
            _replica("p", 0, 9000, {"small-m": 9001, "tiny": 9002}),
            _replica("p", 1, 9000, {"small-m": 9011, "tiny": 9012}, state="draining"),
            _replica("p", 2, 9000, {"other": 9021}),  # runs no engine for these members
            _replica("p", 3, 9000, {"small-m": 9031}, state="starting"),
        ]
    }
    table = served_routes([pool, small, tiny], replicas)
    assert sorted(table) == ["small-m", "tiny"]  # the pool itself is no route
    route = table["small-m"]
    assert route.name == "small" and route.tier == "warm" and route.owner == "alice"
    assert route.endpoints == (
        Endpoint("small", 0, "http://node0:9001", "key0", "http://node0:9000"),
        Endpoint("small", 1, "http://node1:9011", "key1", "http://node1:9000"),
    )
    assert route.draining == frozenset({1}) and [e.url for e in route.ready()] == ["http://node0:9001"]
    assert [e.url for e in table["tiny"].endpoints] == ["http://node0:9002", "http://node1:9012"]


def test_a_sleep_mode_deployment_routes_to_its_engine_and_a_plain_one_to_its_replica() -> None:
    warm = _dep("warm", {"served_model_name": "w", "warm_after_s": 60}, tier="warm")
    plain = _dep("plain", {})
    replicas = {"warm": [_replica("warm", 0, 7000, {"w": 7001})], "plain": [_replica("plain", 4, 8000)]}
    table = served_routes([warm, plain], replicas)
    assert table["w"].endpoints == (Endpoint("warm", 0, "http://node0:7001", "key0", "http://node0:7000"),)
    assert table["plain"].endpoints == (Endpoint("plain", 4, "http://node4:8000", "key4"),)
    assert table["plain"].endpoints[0].agent is None and table["plain"].tier is None


# -- the choice of the replica that serves or wakes a model ----------------------------------------------
def _view(max_awake: int, **engines: tuple[int, str, float]) -> AgentView:
    return AgentView(max_awake, {n: EngineView(p, s, u) for n, (p, s, u) in engines.items()})  # type: ignore[arg-type]


def _end(replica: int, port: int) -> Endpoint:
    return Endpoint("small", replica, f"http://node{replica}:{port}", "k", f"http://node{replica}:9000")


A0, A1, A2 = _end(0, 9001), _end(1, 9001), _end(2, 9001)  # model "m" on port 9001 of each replica


def test_where_the_model_is_awake_wins_over_any_wake() -> None:
    views = {
        "http://node0:9000": _view(2, m=(9001, "asleep", 0), o=(9002, "asleep", 0)),  # free slots
        "http://node1:9000": _view(1, m=(9001, "awake", 50), o=(9002, "asleep", 0)),
        "http://node2:9000": _view(1, m=(9001, "awake", 10)),
    }
    assert choose([A0, A1, A2], views) == Serve((A1, A2))


def test_a_wake_in_flight_then_a_free_slot_the_most_free_first() -> None:
    views = {
        "http://node0:9000": _view(2, m=(9001, "asleep", 0), o=(9002, "awake", 5)),  # one free slot
        # one free slot too: an engine going to sleep holds its GPU memory until it is asleep (the agent
        # counts it, agent_rules.HOLDS_GPU), so a wake there would wait for that sleep
        "http://node1:9000": _view(2, m=(9001, "asleep", 0), o=(9002, "sleeping", 5)),
        "http://node2:9000": _view(1, m=(9001, "asleep", 0), o=(9002, "awake", 1)),
        "http://node3:9000": _view(3, m=(9001, "asleep", 0), o=(9002, "sleeping", 5)),  # two free
    }
    a3 = _end(3, 9001)
    assert choose([A0, A1, A2, a3], views) == Wake(a3, "m")
    assert choose([A1, A0, A2], views) == Wake(A1, "m")  # equals: the candidates' order decides
    full = {  # no slot free now: the rest of a sleep under way beats a whole sleep of an awake engine
        "http://node0:9000": _view(1, m=(9001, "asleep", 0), o=(9002, "awake", 1)),
        "http://node1:9000": _view(1, m=(9001, "asleep", 0), o=(9002, "sleeping", 5)),
    }
    assert choose([A0, A1], full) == Wake(A1, "m")
    waking = {**views, "http://node2:9000": _view(1, m=(9001, "waking", 0), o=(9002, "sleeping", 1))}
    assert choose([A0, A1, A2], waking) == Wake(A2, "m")  # join that wake


def test_no_free_slot_the_least_recently_used_awake_engine_sleeps() -> None:
    views = {
        "http://node0:9000": _view(2, m=(9001, "asleep", 0), o=(9002, "awake", 30), p=(9003, "awake", 40)),
        "http://node1:9000": _view(2, m=(9001, "asleep", 0), o=(9002, "awake", 20), p=(9003, "awake", 90)),
        "http://node2:9000": _view(1, m=(9001, "asleep", 0), o=(9002, "waking", 0)),  # nothing awake to sleep
    }
    assert choose([A0, A1, A2], views) == Wake(A1, "m", victim="o")
    assert choose([A2], views) == Wake(A2, "m")  # queued behind the wake in progress at the agent


def test_unknown_agents_and_engines_are_never_chosen() -> None:
    other_port = _end(0, 9999)
    views = {"http://node0:9000": _view(1, m=(9001, "awake", 0))}
    assert choose([A1, other_port], views) is None  # A1: no view (its agent did not answer); 9999: no engine
    plain = Endpoint("small", 5, "http://node5:8000")
    assert choose([plain], views) is None
    assert endpoint_port("http://node0:9001") == 9001 and endpoint_port("http://node0") is None


def test_a_routes_file_replica_may_name_its_agent() -> None:
    doc = {
        "deployments": [
            {"name": "m", "replicas": [{"replica": 0, "url": "http://n:1/", "agent": "http://n:2/"}]}
        ]
    }
    assert parse_routes(doc)["m"].endpoints == (Endpoint("m", 0, "http://n:1", None, "http://n:2"),)


def test_the_store_gives_a_pool_members_routes_through_the_pool_replicas(tmp_path: Path) -> None:
    store = HistoryStore(f"sqlite:///{tmp_path}/h.db")
    store.upgrade()
    member = {"model": "org/a", "engine": "simulator", "pool": "p", "warm_after_s": 60}
    for name in ("a", "b"):
        spec = build_deployment({**member, "name": name, "served_model_name": f"{name}-served"})
        store.join_pool(name, "alice", spec.model_dump(mode="json"), "p", pool_spec)
    store.upsert_replica("p", 0, state="ready", url="http://n1:9000", host="n1", port=9000, engine_key="ek",
                         models={"a-served": 9001, "b-served": 9002})  # fmt: skip
    store.set_tier("a", "warm", AT)
    table = routes_from_store(store)()
    assert sorted(table) == ["a-served", "b-served"]
    assert table["a-served"].endpoints == (Endpoint("a", 0, "http://n1:9001", "ek", "http://n1:9000"),)
    assert table["a-served"].tier == "warm" and table["b-served"].tier is None
    assert table["b-served"].endpoints[0].url == "http://n1:9002"
