"""The serving controller's tiers and pools, with the store real and Slurm, the launcher and the replica
agents faked: warm puts every awake engine to sleep and keeps the jobs, an agent's ``last_used`` counts as
traffic, a failed sleep is asked again next tick, the forecast floor wakes a warm deployment, idle past
``idle_to_zero_s`` is cold; a pool's replicas are launched with its members' specs, on the sum of their
gateway queues, and members get no replicas of their own; a pool whose members were all requested lately
keeps ceil(members / K) replicas (its awake floor) where the summed load asks for fewer."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from hpcserve.serving.autoscaler import ScalerState
from hpcserve.serving.controller import ServingController
from hpcserve.serving.launcher import Launched
from hpcserve.serving.pools import pool_spec
from hpcserve.serving.scaling import ScalerRecord, state_name
from hpcserve.serving.spec import build_deployment
from hpcserve.serving.tags import secret_hash
from hpcserve.store import EngineSample, HistoryStore
from tests.test_serving_controller import NOW, FakeSlurm, job, policy


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HistoryStore]:
    with HistoryStore(f"sqlite:///{tmp_path}/h.db", admins=["root"]) as s:
        s.upgrade()
        yield s


WARM = {"name": "llm", "model": "m", "engine": "simulator", "warm_after_s": 30, "idle_to_zero_s": 600}


@dataclass
class FakeAgent:
    """Answers like a replica agent; records every call; ``last_used``/``state`` per engine; ``down``:
    every call fails (None), as a timed-out agent does."""

    state: str = "awake"
    last_used: float = 0.0
    down: bool = False
    calls: list[tuple[str, str, str | None]] = field(default_factory=list)

    def __call__(self, method: str, url: str, path: str, key: str | None) -> dict[str, Any] | None:
        self.calls.append((method, f"{url}{path}", key))
        if self.down:
            return None
        if path == "/hpcserve/engines":
            return {"max_awake": 1, "engines": {"llm": {"port": 9001, "state": self.state,
                                                        "last_used": self.last_used}}}  # fmt: skip
        self.state = "asleep" if "sleep" in path else "awake"
        return {}

    def posts(self) -> list[str]:
        return [url for method, url, _ in self.calls if method == "POST"]


@dataclass
class PoolLauncher:
    slurm: FakeSlurm
    launched: list[tuple[str, int, list[dict[str, Any]] | None]] = field(default_factory=list)

    def launch(self, submitter: Any, deployment: Any, spec: Any, index: int,
               members: list[dict[str, Any]] | None = None) -> Launched:  # fmt: skip
        self.launched.append((deployment.name, index, members))
        self.slurm.queue.append(job(600 + index, deployment.name, index, deployment.owner))
        return Launched(str(600 + index), secret_hash("s"), "engine-key")


def controller(store: HistoryStore, agent: FakeAgent, floor: int = 0) -> tuple[ServingController, FakeSlurm]:
    slurm = FakeSlurm([job(100, "llm", 0)])
    unused: Any = None
    made = ServingController(store=store, client=slurm, submitter=lambda: unused,  # type: ignore[arg-type]
                             launcher=PoolLauncher(slurm), policy=policy(),  # type: ignore[arg-type]
                             ready_timeout_s=60, scrape=lambda url: None, service_user="root",
                             clock=lambda: NOW, agent=agent,
                             prewarm=(lambda d, now: floor) if floor else None)  # fmt: skip
    return made, slurm


def warm_deployment(store: HistoryStore, idle_s: float, tier: str | None = None) -> None:
    store.create_deployment("llm", "alice", WARM, 1, served_model_name="llm")
    store.upsert_replica("llm", 0, job_id="100", state="ready", url="http://n1:7000", host="n1", port=7000,
                         models={"llm": 9001}, engine_key="k0")  # fmt: skip
    state = ScalerState(last_traffic=NOW - timedelta(seconds=idle_s), needed_at=(NOW,))
    store.put_state(state_name("llm"), ScalerRecord(state).to_json())
    if tier:
        store.set_tier("llm", tier, NOW - timedelta(seconds=idle_s))


def tier(store: HistoryStore, name: str = "llm") -> str | None:
    found = store.get_deployment(name)
    assert found is not None
    return found.tier


def test_idle_past_warm_after_s_sleeps_the_engines_and_keeps_the_job(store: HistoryStore) -> None:
    warm_deployment(store, idle_s=40)
    agent = FakeAgent()
    ctl, slurm = controller(store, agent)
    ctl.tick()
    assert tier(store) == "warm"
    assert agent.posts() == ["http://n1:7000/hpcserve/sleep?model=all"]
    assert all(key == "k0" for _, _, key in agent.calls)  # the replica's engine key
    assert slurm.cancelled == [] and [r.state for r in store.replicas("llm")] == ["ready"]
    ctl.tick()  # asleep now: nothing more to do
    assert agent.posts() == ["http://n1:7000/hpcserve/sleep?model=all"]


def test_an_engine_the_agent_saw_used_keeps_it_hot(store: HistoryStore) -> None:
    warm_deployment(store, idle_s=40)
    agent = FakeAgent(last_used=(NOW - timedelta(seconds=5)).timestamp())  # the gateway woke it
    controller(store, agent)[0].tick()
    assert tier(store) in (None, "hot") and agent.posts() == []


def test_a_failed_sleep_is_asked_again_next_tick(store: HistoryStore) -> None:
    warm_deployment(store, idle_s=40)
    agent = FakeAgent(down=True)
    ctl, _ = controller(store, agent)
    ctl.tick()
    assert tier(store) == "warm" and len(agent.posts()) == 1
    agent.down = False
    ctl.tick()
    assert len(agent.posts()) == 2 and agent.state == "asleep"


def test_the_forecast_floor_wakes_a_warm_deployment(store: HistoryStore) -> None:
    warm_deployment(store, idle_s=100, tier="warm")
    agent = FakeAgent(state="asleep")
    controller(store, agent, floor=1)[0].tick()
    assert tier(store) == "hot"
    assert agent.posts() == ["http://n1:7000/hpcserve/wake?model=llm"]


def test_idle_past_idle_to_zero_is_cold_and_scales_to_zero(store: HistoryStore) -> None:
    warm_deployment(store, idle_s=700, tier="warm")
    controller(store, FakeAgent(state="asleep"))[0].tick()
    found = store.get_deployment("llm")
    assert found is not None and found.tier == "cold" and found.desired_replicas == 0


def member(name: str, **extra: Any) -> dict[str, Any]:
    spec = build_deployment({"name": name, "model": f"org/{name}", "engine": "simulator", "pool": "pool",
                             "pool_max_awake": 2, "idle_to_zero_s": 600, **extra})  # fmt: skip
    return spec.model_dump(mode="json")


def test_a_pool_launches_one_replica_with_its_members_on_their_summed_queue(store: HistoryStore) -> None:
    for name in ("a", "b", "c"):
        store.join_pool(name, "alice", member(name), "pool", pool_spec, served_model_name=name)
    store.add_engine_samples([EngineSample(NOW, "b", None, gateway_waiting=1, source="gw1")])
    ctl, slurm = controller(store, FakeAgent())
    slurm.queue.clear()
    launcher: PoolLauncher = ctl.launcher  # type: ignore[assignment]
    ctl.tick()
    assert [(name, index) for name, index, _ in launcher.launched] == [("pool", 0)]
    members = launcher.launched[0][2]
    assert members is not None and [m["name"] for m in members] == ["a", "b", "c"]
    assert [r.deployment for r in store.replicas()] == ["pool"]  # members have none of their own


def test_a_pool_replica_without_a_new_member_is_handed_over(store: HistoryStore) -> None:
    for name in ("a", "b"):
        store.join_pool(name, "alice", member(name), "pool", pool_spec, served_model_name=name)
    store.set_desired("pool", 1, user="root")
    store.upsert_replica("pool", 0, job_id="600", state="ready", url="http://n1:7000", host="n1", port=7000,
                         models={"a": 9001, "b": 9002}, engine_key="k")  # fmt: skip
    ctl, slurm = controller(store, FakeAgent())
    slurm.queue[:] = [job(600, "pool", 0)]
    launcher: PoolLauncher = ctl.launcher  # type: ignore[assignment]
    ctl.tick()
    assert launcher.launched == []  # its engines are the members: kept
    store.join_pool("c", "alice", member("c"), "pool", pool_spec, served_model_name="c")
    ctl.tick()
    assert [(name, index) for name, index, _ in launcher.launched] == [("pool", 1)]
    members = launcher.launched[0][2]
    assert members is not None and [m["name"] for m in members] == ["a", "b", "c"]
    old = store.replicas("pool")[0]
    assert (old.index, old.state) == (0, "ready")  # it serves until its successor is ready


@dataclass
class PoolAgent:
    """A pool replica's agent: one engine per member, ``used``: each one's ``last_used`` (unix s)."""

    used: dict[str, float]

    def __call__(self, method: str, url: str, path: str, key: str | None) -> dict[str, Any] | None:
        if path != "/hpcserve/engines":
            return {}
        engines = {name: {"port": 9001 + i, "state": "awake" if i < 2 else "asleep", "last_used": used}
                   for i, (name, used) in enumerate(self.used.items())}  # fmt: skip
        return {"max_awake": 2, "engines": engines}


MEMBERS = ("a", "b", "c", "d")
READY_AT = NOW - timedelta(seconds=120)


def pool_of_four(store: HistoryStore) -> None:
    """Four members at K = 2 (up to 4 replicas) on one ready replica; one request buffered at a gateway:
    the summed load asks for one replica."""
    for name in MEMBERS:
        store.join_pool(
            name, "alice", member(name, max_replicas=4), "pool", pool_spec, served_model_name=name
        )
    store.set_desired("pool", 1, user="root")
    store.upsert_replica("pool", 0, job_id="600", state="ready", url="http://n1:7000", host="n1", port=7000,
                         models={m: 9001 + i for i, m in enumerate(MEMBERS)}, engine_key="k",
                         ready_at=READY_AT)  # fmt: skip
    store.add_engine_samples([EngineSample(NOW, "a", None, gateway_waiting=1, source="gw1")])


def pool_tick(store: HistoryStore, used: dict[str, float], now: datetime = NOW) -> PoolLauncher:
    ctl, slurm = controller(store, PoolAgent(used))  # type: ignore[arg-type]
    ctl.clock = lambda: now
    slurm.queue[:] = [job(int(r.job_id or 0), "pool", r.index) for r in store.replicas("pool")]
    ctl.tick()
    launcher: PoolLauncher = ctl.launcher  # type: ignore[assignment]
    return launcher


def desired(store: HistoryStore, name: str = "pool") -> int:
    found = store.get_deployment(name)
    assert found is not None
    return found.desired_replicas


def test_a_pool_of_four_members_all_requested_lately_keeps_two_replicas_at_k_2(store: HistoryStore) -> None:
    pool_of_four(store)
    lately = (NOW - timedelta(seconds=30)).timestamp()
    launcher = pool_tick(store, dict.fromkeys(MEMBERS, lately))
    assert desired(store) == 2  # ceil(4 / 2), though the summed load (one request) asks for 1
    assert [(name, index) for name, index, _ in launcher.launched] == [("pool", 1)]
    # a restarted service 50 s later whose agents no longer show those uses (say, the replica was
    # replaced): the stored state keeps the floor
    started = (READY_AT - timedelta(seconds=60)).timestamp()
    launcher = pool_tick(store, dict.fromkeys(MEMBERS, started), NOW + timedelta(seconds=50))
    assert desired(store) == 2 and launcher.launched == []


def test_engines_stamped_only_by_their_start_are_not_in_use(store: HistoryStore) -> None:
    pool_of_four(store)
    started = (READY_AT - timedelta(seconds=60)).timestamp()  # the agent stamps each engine it starts
    used = dict.fromkeys(MEMBERS, started) | {"b": (NOW - timedelta(seconds=5)).timestamp()}
    launcher = pool_tick(store, used)
    assert desired(store) == 1 and launcher.launched == []  # a and b in use: one job holds both awake
