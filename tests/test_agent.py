"""The replica agent: its pure rules (which engine sleeps, what the answers say), then the agent's HTTP API
in front of real engine simulators (in this process, on 127.0.0.1, in sleep mode and dev mode): wake,
sleep, LRU by last_used (from the engines' /metrics), never more than max_awake awake (every engine's own
/is_sleeping polled throughout), concurrent wakes serialized, and the engine key required."""

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
from hpcserve.serving.agent import EngineCallError, ReplicaAgent, serve
from hpcserve.serving.agent_rules import (
    EngineState,
    EngineView,
    Seen,
    UnknownModel,
    engines_body,
    make_room,
    member_gpu_utilization,
    seen,
    sleep_targets,
    victims,
    wake_body,
)

KEY = "engine-key-for-tests"
AWAKE, ASLEEP = EngineState.AWAKE, EngineState.ASLEEP

# pure: the rules -------------------------------------------------------------------------------------------


def _views(**states: tuple[EngineState, float]) -> dict[str, EngineView]:
    return {name: EngineView(8000 + i, state, used) for i, (name, (state, used)) in enumerate(states.items())}


def test_make_room_sleeps_the_least_recently_used_awake_engine() -> None:
    engines = _views(a=(AWAKE, 30.0), b=(AWAKE, 10.0), c=(ASLEEP, 0.0), d=(AWAKE, 20.0))
    assert make_room(engines, 3) == ["b"]
    assert make_room(engines, 2) == ["b", "d"]  # more awake than allowed: down to one free slot
    assert make_room(engines, 4) == []
    assert make_room(engines, 2, keep="b") == ["d"]  # never the one being woken


def test_waking_and_sleeping_engines_hold_gpu_memory_too() -> None:
    engines = _views(a=(EngineState.SLEEPING, 0.0), b=(AWAKE, 5.0), c=(ASLEEP, 0.0))
    assert victims(engines, 2, "c") == ["b"]
    engines = _views(a=(EngineState.WAKING, 0.0), b=(ASLEEP, 0.0))
    assert victims(engines, 1, "b") == []  # nothing awake to sleep (the lock keeps this from happening)


def test_victims_none_when_awake_or_room_and_unknown_model_is_named() -> None:
    engines = _views(a=(AWAKE, 1.0), b=(ASLEEP, 0.0))
    assert victims(engines, 1, "a") == []
    assert victims(engines, 1, "b") == ["a"]
    assert victims(engines, 2, "b") == []
    with pytest.raises(UnknownModel) as exc:
        victims(engines, 1, "zzz")
    assert str(exc.value) == "model: 'zzz' is not served by this replica (fix: one of a, b)"


def test_sleep_targets_skip_engines_asleep_already() -> None:
    engines = _views(a=(AWAKE, 1.0), b=(ASLEEP, 0.0), c=(EngineState.WAKING, 0.0))
    assert sleep_targets(engines, "all") == ["a", "c"]
    assert sleep_targets(engines, "a") == ["a"]
    assert sleep_targets(engines, "b") == []
    with pytest.raises(UnknownModel):
        sleep_targets(engines, "d")


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


def _sim(name: str) -> SimConfig:
    return SimConfig(
        model=f"sim/{name}", served_model_name=name, port=0, api_key=KEY, enable_sleep_mode=True,
        dev_mode=True, sleep_time_scale=0.05, weights_gib=1.0, decode_s_per_token=0.02,
    )  # fmt: skip


@dataclass
class Replica:
    """Engine simulators, the agent in front of them, and a client that speaks to both."""

    sims: dict[str, SimServer]
    agent: ReplicaAgent
    url: str
    http: aiohttp.ClientSession
    max_seen_awake: int = 0
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
            await asyncio.sleep(0.005)

    async def agrees(self) -> None:
        """Once quiet, the agent's states are exactly what the engines say."""
        engines = (await self.call("GET", "/hpcserve/engines"))[1]["engines"]
        for name, asleep in (await self.sleeping()).items():
            assert engines[name]["state"] == ("asleep" if asleep else "awake"), (name, engines)


@contextlib.asynccontextmanager
async def replica(names: list[str], max_awake: int, poll_s: float = 0.05) -> AsyncIterator[Replica]:
    """Starts the engines one at a time as a replica does (making room before each), then the agent."""
    agent = ReplicaAgent(max_awake, key=KEY, poll_s=poll_s)
    sims: dict[str, SimServer] = {}
    await agent.open()
    async with aiohttp.ClientSession() as http:
        rep = Replica(sims, agent, "", http)
        watcher = asyncio.create_task(rep.watch())
        try:
            for name in names:
                await agent.make_room()
                sims[name] = await start(_sim(name))
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
