"""The replica agent: its pure rules (which wakes start, which engine sleeps, what the answers say), then the
agent's HTTP API in front of real engine simulators (in this process, on 127.0.0.1, in sleep mode and dev
mode): wake, sleep, LRU by last_used (from the engines' /metrics), never more than max_awake awake (every
engine's own /is_sleeping polled throughout, and the agent's count of engines holding GPU memory), a wake
into a free slot not waiting behind a slow sleep of another engine, concurrent wakes of one model shared,
a model being woken not put to sleep, and the engine key required."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from hpcserve.enginesim.core import SimConfig
from hpcserve.enginesim.server import SimServer, start
from hpcserve.enginesim.timing import sleep_seconds
from hpcserve.serving.agent import EngineCallError, ReplicaAgent, serve
from hpcserve.serving.agent_rules import (
    EngineState,
    EngineView,
    Moves,
    Seen,
    SleepPlan,
    UnknownModel,
    engines_body,
    holding,
    make_room,
    member_gpu_utilization,
    next_moves,
    seen,
    sleep_body,
    sleep_plan,
    wake_body,
)

KEY = "engine-key-for-tests"
AWAKE, ASLEEP = EngineState.AWAKE, EngineState.ASLEEP
WAKING, SLEEPING = EngineState.WAKING, EngineState.SLEEPING

# pure: the rules -------------------------------------------------------------------------------------------


def _views(**states: tuple[EngineState, float]) -> dict[str, EngineView]:
    return {name: EngineView(8000 + i, state, used) for i, (name, (state, used)) in enumerate(states.items())}


def test_make_room_sleeps_the_least_recently_used_awake_engine() -> None:
    engines = _views(a=(AWAKE, 30.0), b=(AWAKE, 10.0), c=(ASLEEP, 0.0), d=(AWAKE, 20.0))
    assert make_room(engines, 3) == ["b"]
    assert make_room(engines, 2) == ["b", "d"]  # more awake than allowed: down to one free slot
    assert make_room(engines, 4) == []
    assert make_room(engines, 2, wanted={"b"}) == ["d", "a"]  # never one a wake waits for
    assert make_room(engines, 4, reserved=1) == ["b"]  # a slot kept for an engine starting
    assert make_room(engines, 3, slots=2) == ["b", "d"]


def test_waking_and_sleeping_engines_hold_gpu_memory_and_a_sleep_under_way_frees_a_slot() -> None:
    engines = _views(a=(SLEEPING, 0.0), b=(AWAKE, 5.0), c=(ASLEEP, 0.0))
    assert holding(engines) == 2
    assert next_moves(engines, 2, ["c"]) == Moves()  # a's sleep frees the slot c waits for: b stays
    assert next_moves(engines, 2, ["c", "a"]) == Moves(sleep={"b": "c"})  # a waits for a slot of its own
    engines = _views(a=(WAKING, 0.0), b=(ASLEEP, 0.0))
    assert next_moves(engines, 1, ["b"]) == Moves()  # nothing awake to sleep: b waits for a slot


def test_a_wake_with_a_free_slot_starts_while_another_engine_goes_to_sleep() -> None:
    engines = _views(a=(SLEEPING, 0.0), b=(ASLEEP, 0.0), c=(ASLEEP, 0.0), d=(AWAKE, 1.0))
    assert next_moves(engines, 3, ["b", "c"]) == Moves(wake=("b",), sleep={})  # c: a's sleep frees one
    # a slot kept for an engine starting: b gets the slot a's sleep frees, d sleeps for c
    assert next_moves(engines, 3, ["b", "c"], reserved=1) == Moves(sleep={"d": "c"})
    assert next_moves(engines, 4, ["c", "b", "c"]) == Moves(wake=("c", "b"))  # first come, once each


def test_waiting_models_get_lru_engines_put_to_sleep_for_them_in_order() -> None:
    engines = _views(a=(AWAKE, 30.0), b=(AWAKE, 10.0), c=(ASLEEP, 0.0), d=(ASLEEP, 0.0), e=(AWAKE, 20.0))
    assert next_moves(engines, 3, ["c", "d"]) == Moves(sleep={"b": "c", "e": "d"})
    assert next_moves(engines, 3, ["c", "a"]) == Moves(ready=("a",), sleep={"b": "c"})  # a: awake
    over = _views(a=(AWAKE, 1.0), b=(AWAKE, 2.0), c=(ASLEEP, 0.0))  # more awake than allowed
    assert next_moves(over, 1, ["c"]) == Moves(sleep={"a": "c", "b": "c"})
    with pytest.raises(KeyError):
        next_moves(engines, 3, ["zzz"])


def test_a_sleep_call_keeps_the_models_a_wake_waits_for() -> None:
    engines = _views(a=(AWAKE, 1.0), b=(ASLEEP, 0.0), c=(WAKING, 0.0), d=(SLEEPING, 0.0), e=(AWAKE, 2.0))
    assert sleep_plan(engines, "all") == SleepPlan(["a", "d", "e"], ["c"])
    assert sleep_plan(engines, "all", wanted={"c", "e"}) == SleepPlan(["a", "d"], ["c", "e"])
    assert sleep_plan(engines, "a") == SleepPlan(["a"], [])
    assert sleep_plan(engines, "b") == SleepPlan([], [])
    assert sleep_plan(engines, "d", wanted={"d"}) == SleepPlan([], ["d"])  # woken once it is asleep
    assert sleep_body(SleepPlan(["a"], [])) == {"slept": ["a"]}
    assert sleep_body(SleepPlan([], ["c"])) == {"slept": [], "kept": ["c"]}
    with pytest.raises(UnknownModel) as exc:
        sleep_plan(engines, "zzz")
    assert str(exc.value) == "model: 'zzz' is not served by this replica (fix: one of a, b, c, d, e)"


def test_a_scrape_shows_use_or_requests_parked_on_a_sleeping_engine() -> None:
    assert seen(AWAKE, 0, 0) is Seen.IDLE and seen(ASLEEP, 0, 0) is Seen.IDLE
    assert seen(AWAKE, 1, 0) is Seen.USED and seen(AWAKE, 0, 3) is Seen.USED
    assert seen(ASLEEP, 0, 2) is Seen.PARKED


def test_pool_member_gpu_share_and_answer_bodies() -> None:
    assert member_gpu_utilization(None, 2) == 0.45
    assert member_gpu_utilization(0.5, 4) == 0.125
    engines = _views(a=(AWAKE, 1.23456))
    assert engines_body(2, engines) == {
        "max_awake": 2,
        "engines": {"a": {"port": 8000, "state": "awake", "last_used": 1.235}},
    }
    assert wake_body("a", True, ["b"], 0.1234) == {"model": "a", "woke": True, "slept": "b", "wake_s": 0.123}
    assert wake_body("a", False, [], 0.0)["slept"] is None


# the agent in front of engine simulators -------------------------------------------------------------------


def _sim(name: str, gib: float = 1.0, scale: float = 0.05) -> SimConfig:
    return SimConfig(
        model=f"sim/{name}", served_model_name=name, port=0, api_key=KEY, enable_sleep_mode=True,
        dev_mode=True, sleep_time_scale=scale, weights_gib=gib, decode_s_per_token=0.02,
    )  # fmt: skip


@dataclass
class Replica:
    """Engine simulators, the agent in front of them, and a client that speaks to both."""

    sims: dict[str, SimServer]
    agent: ReplicaAgent
    url: str
    http: aiohttp.ClientSession
    max_seen_awake: int = 0
    max_holding: int = 0  # the agent's own count: awake, waking and going to sleep
    mismatches: list[str] = field(default_factory=list)

    async def call(self, method: str, path: str, key: str | None = KEY) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with self.http.request(method, self.url + path, headers=headers) as response:
            return response.status, await response.json()

    async def sleeping(self) -> dict[str, bool]:
        """Each engine's own answer to /is_sleeping."""

        async def one(sim: SimServer) -> bool:
            async with self.http.get(sim.url + "/is_sleeping") as response:
                return bool((await response.json())["is_sleeping"])

        sims = list(self.sims.items())  # engines may start meanwhile
        answers = await asyncio.gather(*(one(sim) for _, sim in sims))
        return {name: asleep for (name, _), asleep in zip(sims, answers, strict=True)}

    async def watch(self) -> None:
        """Poll every engine's /is_sleeping and record the most engines seen awake at once."""
        while True:
            awake = sum(not s for s in (await self.sleeping()).values())
            self.max_seen_awake = max(self.max_seen_awake, awake)
            self.max_holding = max(self.max_holding, holding(self.agent.engines))
            await asyncio.sleep(0.005)

    async def until(self, name: str, state: EngineState, timeout_s: float = 1.0) -> None:
        """Wait (polling the agent) until it has ``name`` in ``state``."""
        async with asyncio.timeout(timeout_s):
            while self.agent.engines[name].state is not state:
                await asyncio.sleep(0.005)

    async def agrees(self) -> None:
        """Once quiet, the agent's states are exactly what the engines say."""
        engines = (await self.call("GET", "/hpcserve/engines"))[1]["engines"]
        for name, asleep in (await self.sleeping()).items():
            assert engines[name]["state"] == ("asleep" if asleep else "awake"), (name, engines)


@contextlib.asynccontextmanager
async def replica(
    names: list[str], max_awake: int, poll_s: float = 0.05, gib: dict[str, float] | None = None,
    scale: float = 0.05,
) -> AsyncIterator[Replica]:  # fmt: skip
    """Starts the engines one at a time as a replica does (making room before each), then the agent;
    ``gib``: weights of some engines (1 GiB otherwise), ``scale``: the simulator's sleep time scale."""
    agent = ReplicaAgent(max_awake, key=KEY, poll_s=poll_s)
    sims: dict[str, SimServer] = {}
    await agent.open()
    async with aiohttp.ClientSession() as http:
        rep = Replica(sims, agent, "", http)
        watcher = asyncio.create_task(rep.watch())
        try:
            for name in names:
                await agent.make_room()
                sims[name] = await start(_sim(name, (gib or {}).get(name, 1.0), scale))
                await agent.add_engine(name, sims[name].port)
            runner, port = await serve(agent, "127.0.0.1")
            rep.url = f"http://127.0.0.1:{port}"
            yield rep
            await runner.cleanup()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await agent.close()
            for sim in sims.values():
                await sim.close()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


def test_start_one_at_a_time_leaves_the_last_k_awake() -> None:
    async def scenario() -> None:
        async with replica(["a", "b", "c", "d"], max_awake=2) as rep:
            assert await rep.sleeping() == {"a": True, "b": True, "c": False, "d": False}
            status, body = await rep.call("GET", "/hpcserve/engines")
            assert status == 200 and body["max_awake"] == 2
            assert {n: e["port"] for n, e in body["engines"].items()} == {
                n: s.port for n, s in rep.sims.items()
            }
            assert rep.agent.models == {n: s.port for n, s in rep.sims.items()}
            await rep.agrees()
            assert rep.max_seen_awake <= 2

    run(scenario)


def test_wake_sleeps_the_lru_engine_and_never_exceeds_max_awake() -> None:
    async def scenario() -> None:
        async with replica(["a", "b", "c", "d"], max_awake=2) as rep:
            status, body = await rep.call("POST", "/hpcserve/wake?model=a")  # c, d awake: c is older
            assert status == 200 and body["model"] == "a" and body["woke"] and body["slept"] == "c"
            assert body["wake_s"] > 0
            status, body = await rep.call("POST", "/hpcserve/wake?model=a")  # awake already
            assert (status, body["woke"], body["slept"]) == (200, False, None)
            for name in ["b", "c", "a", "d", "b", "a", "c"]:
                status, body = await rep.call("POST", f"/hpcserve/wake?model={name}")
                assert status == 200 and body["model"] == name
                assert not (await rep.sleeping())[name]
                await rep.agrees()
            assert rep.max_seen_awake <= 2

    run(scenario)


def test_requests_running_on_an_engine_make_it_recently_used() -> None:
    async def scenario() -> None:
        async with replica(["a", "b", "c"], max_awake=2) as rep:  # b, c awake; b woke first
            body = {"model": "b", "prompt": "hi", "max_tokens": 40}
            headers = {"Authorization": f"Bearer {KEY}"}
            request = asyncio.create_task(
                rep.http.post(rep.sims["b"].url + "/v1/completions", json=body, headers=headers)
            )
            await asyncio.sleep(0.3)  # b is seen busy by the agent's /metrics poll, after c's last use
            status, answer = await rep.call("POST", "/hpcserve/wake?model=a")
            assert status == 200 and answer["slept"] == "c"
            response = await request
            assert response.status == 200
            assert (await response.json())["choices"][0]["finish_reason"] == "length"
            response.release()

    run(scenario)


def test_sleep_waits_for_running_requests_and_is_idempotent() -> None:
    async def scenario() -> None:
        async with replica(["a", "b"], max_awake=2) as rep:
            body = {"model": "a", "prompt": "hi", "max_tokens": 20}
            headers = {"Authorization": f"Bearer {KEY}"}
            request = asyncio.create_task(
                rep.http.post(rep.sims["a"].url + "/v1/completions", json=body, headers=headers)
            )
            await asyncio.sleep(0.05)
            assert await rep.call("POST", "/hpcserve/sleep?model=a") == (200, {"slept": ["a"]})
            response = await request
            assert (await response.json())["choices"][0][
                "finish_reason"
            ] == "length"  # mode=wait: not aborted
            response.release()
            assert await rep.call("POST", "/hpcserve/sleep?model=all") == (200, {"slept": ["b"]})
            assert await rep.call("POST", "/hpcserve/sleep?model=all") == (200, {"slept": []})
            assert await rep.sleeping() == {"a": True, "b": True}
            await rep.agrees()

    run(scenario)


def test_a_request_parked_on_a_sleeping_engine_wakes_it() -> None:
    async def scenario() -> None:
        async with replica(["a", "b"], max_awake=1) as rep:  # b awake, a asleep
            body = {"model": "a", "prompt": "hi", "max_tokens": 2}
            headers = {"Authorization": f"Bearer {KEY}"}
            url = rep.sims["a"].url + "/v1/completions"
            async with rep.http.post(url, json=body, headers=headers) as response:  # held: a sleeps
                assert response.status == 200 and (await response.json())["choices"][0]["finish_reason"]
            assert await rep.sleeping() == {"a": False, "b": True}
            assert rep.max_seen_awake <= 1
            await rep.agrees()

    run(scenario)


def test_concurrent_wakes_are_serialized() -> None:
    async def scenario() -> None:
        async with replica(["a", "b", "c", "d"], max_awake=1) as rep:
            names = ["a", "b", "c", "a", "b", "d"]
            answers = await asyncio.gather(*(rep.call("POST", f"/hpcserve/wake?model={n}") for n in names))
            assert all(status == 200 for status, _ in answers)
            assert rep.max_seen_awake <= 1
            awake = [n for n, asleep in (await rep.sleeping()).items() if not asleep]
            assert len(awake) == 1
            await rep.agrees()

    run(scenario)


def test_the_engine_key_is_required_and_bad_requests_are_named() -> None:
    async def scenario() -> None:
        async with replica(["a"], max_awake=1) as rep:
            for key in (None, "wrong"):
                for method, path in (("GET", "/hpcserve/engines"), ("POST", "/hpcserve/wake?model=a")):
                    status, body = await rep.call(method, path, key=key)
                    assert status == 401 and body["error"].startswith("Authorization:")
            status, body = await rep.call("POST", "/hpcserve/wake?model=zzz")
            assert status == 404 and body["error"].startswith("model: 'zzz'")
            status, body = await rep.call("POST", "/hpcserve/sleep?model=zzz")
            assert status == 404
            status, body = await rep.call("POST", "/hpcserve/wake")
            assert status == 400 and body["error"].startswith("model: missing")

    run(scenario)


def test_an_agent_without_a_key_answers_everyone() -> None:
    async def scenario() -> None:
        agent = ReplicaAgent(1)
        runner, port = await serve(agent, "127.0.0.1")
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/hpcserve/engines") as r,
        ):
            assert (r.status, await r.json()) == (200, {"max_awake": 1, "engines": {}})
        await runner.cleanup()

    run(scenario)


def test_an_engine_without_dev_mode_is_refused_with_the_fix() -> None:
    async def scenario() -> None:
        sim = await start(SimConfig(model="sim/plain", port=0, enable_sleep_mode=True))  # no dev mode
        agent = ReplicaAgent(1)
        await agent.open()
        try:
            with pytest.raises(
                EngineCallError, match=r"/is_sleeping answered 404 \(fix: start it with --enable"
            ):
                await agent.add_engine("plain", sim.port)
        finally:
            await agent.close()
            await sim.close()

    run(scenario)


SCALE = 0.2  # sleep and wake durations large enough to see their order


def _seconds_asleep(gib: float) -> float:
    return sleep_seconds(1, gib, SCALE)


def test_a_wake_into_a_free_slot_goes_ahead_of_a_slow_sleep_of_another_engine() -> None:
    async def scenario() -> None:
        async with replica(["a", "b", "c"], max_awake=2, gib={"b": 64.0}, scale=SCALE) as rep:
            assert await rep.sleeping() == {"a": True, "b": False, "c": False}
            assert await rep.call("POST", "/hpcserve/sleep?model=c") == (200, {"slept": ["c"]})
            began = asyncio.get_running_loop().time()
            slow = asyncio.create_task(rep.call("POST", "/hpcserve/sleep?model=b"))  # the controller's
            await rep.until("b", EngineState.SLEEPING)  # 64 GiB: 2 s here
            status, body = await rep.call("POST", "/hpcserve/wake?model=a")  # one slot is free
            woke_after = asyncio.get_running_loop().time() - began
            assert status == 200 and body["woke"] and body["slept"] is None
            assert not slow.done() and woke_after < _seconds_asleep(64.0) / 2, woke_after
            assert await slow == (200, {"slept": ["b"]})
            assert await rep.sleeping() == {"a": False, "b": True, "c": True}
            assert rep.max_seen_awake <= 2 and rep.max_holding <= 2
            await rep.agrees()

    run(scenario)


def test_wakes_never_put_more_than_max_awake_on_the_gpu_while_engines_sleep() -> None:
    async def scenario() -> None:
        names = ["a", "b", "c", "d", "e"]
        async with replica(names, max_awake=2, gib={"d": 64.0, "e": 64.0}, scale=SCALE) as rep:
            sleeps = asyncio.create_task(rep.call("POST", "/hpcserve/sleep?model=all"))  # d, e: slow
            await rep.until("e", EngineState.SLEEPING)
            wakes = [rep.call("POST", f"/hpcserve/wake?model={n}") for n in ["a", "b", "c", "a", "c"]]
            answers = await asyncio.gather(*wakes)
            assert all(status == 200 for status, _ in answers)
            assert (await sleeps)[0] == 200
            assert rep.max_holding <= 2 and rep.max_seen_awake <= 2
            assert sum(not asleep for asleep in (await rep.sleeping()).values()) <= 2
            await rep.agrees()

    run(scenario)


def test_concurrent_wakes_of_one_model_share_one_wake() -> None:
    async def scenario() -> None:
        async with replica(["a", "b"], max_awake=1, scale=SCALE) as rep:  # b awake
            answers = await asyncio.gather(*(rep.call("POST", "/hpcserve/wake?model=a") for _ in range(3)))
            assert all(status == 200 for status, _ in answers)
            bodies = [body for _, body in answers]
            assert bodies[0]["woke"] and bodies[0]["slept"] == "b" and bodies == [bodies[0]] * 3
            assert await rep.sleeping() == {"a": False, "b": True}
            assert rep.max_holding <= 1

    run(scenario)


def test_a_model_being_woken_is_not_put_to_sleep() -> None:
    async def scenario() -> None:
        async with replica(["a", "b"], max_awake=1, gib={"b": 64.0}, scale=SCALE) as rep:  # b awake
            wake = asyncio.create_task(rep.call("POST", "/hpcserve/wake?model=a"))  # b sleeps first: 2 s
            await rep.until("b", EngineState.SLEEPING)
            assert await rep.call("POST", "/hpcserve/sleep?model=a") == (200, {"slept": [], "kept": ["a"]})
            status, body = await rep.call("POST", "/hpcserve/sleep?model=all")  # the warm tier's
            assert (status, body) == (200, {"slept": ["b"], "kept": ["a"]})  # b's sleep under way
            assert rep.agent.engines["a"].state is EngineState.WAKING  # kept waking, not put to sleep
            status, body = await wake
            assert status == 200 and body["woke"] and body["slept"] == "b" and body["wake_s"] > 0
            assert await rep.sleeping() == {"a": False, "b": True}
            await rep.agrees()

    run(scenario)


def test_a_wake_waits_for_its_model_to_finish_going_to_sleep_then_wakes_it() -> None:
    async def scenario() -> None:
        async with replica(["a", "b"], max_awake=2, gib={"a": 64.0}, scale=SCALE) as rep:  # both awake
            slow = asyncio.create_task(rep.call("POST", "/hpcserve/sleep?model=a"))
            await rep.until("a", EngineState.SLEEPING)
            status, body = await rep.call("POST", "/hpcserve/wake?model=a")  # demand: woken once asleep
            assert status == 200 and body["woke"] and body["slept"] is None
            assert await slow == (200, {"slept": ["a"]})
            assert await rep.sleeping() == {"a": False, "b": False}
            assert rep.max_holding <= 2

    run(scenario)
