"""Hold-and-wake end to end on 127.0.0.1: the gateway in process, engine simulators in sleep mode as the
engines, and the real replica agent (hpcserve.serving.agent) in front of them, as a warm-tier or pool
replica runs them.

- a request to a sleeping model is held, the model woken through the agent, then answered; its TTFT
  includes the wake (and stays under the modelled wake time + 1 s); the engine never got a request
  while asleep (the simulator counts those);
- concurrent requests to a sleeping model make one wake call, and count as waiting demand meanwhile;
- in a pool, the replica where the model is awake serves it, with no wake; with no slot free the agent
  sleeps the least recently used model, and never more than max_awake are awake;
- an engine put to sleep by someone else as a request is sent to it is woken again (by its agent);
- a failed wake tries another replica; none left (or no agent answers): 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec
from aiohttp import ClientSession

from hpcserve.enginesim import server as engine_sim
from hpcserve.enginesim.core import SimConfig
from hpcserve.enginesim.timing import TAGS, wake_seconds
from hpcserve.model.gateway import ApiKey, DeploymentRoute, Endpoint
from hpcserve.serving.agent import ReplicaAgent, serve
from hpcserve.serving.agent_rules import EngineState
from hpcserve.serving.gateway import (
    GatewayConfig,
    GatewaySample,
    StaticRoutes,
    hash_key,
    make_admin_app,
    make_app,
)
from hpcserve.serving.gateway.app import STATE
from hpcserve.serving.gateway.state import GatewayState
from tests.test_gateway import serving
from tests.test_gateway_overload import metric

KEY, ENGINE_KEY, BOBS_KEY = "sk-wake", "ek-replica", "sk-bob"
KEYS = [ApiKey("k", "alice", hash_key(KEY)), ApiKey("b", "bob", hash_key(BOBS_KEY))]
FAST = GatewayConfig(refresh_interval_s=0.05, report_interval_s=0.05, usage_flush_interval_s=0.1)
SCALE, GIB = 0.05, 16.0
WAKE_S = wake_seconds(1, GIB, frozenset(TAGS), SCALE)  # the simulator's modelled level-1 wake


class CountingAgent(ReplicaAgent):
    """The real agent, counting the wake calls it gets."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wake_calls: list[str] = []

    async def wake(self, name: str) -> dict[str, Any]:
        self.wake_calls.append(name)
        return await super().wake(name)

    def awake(self) -> set[str]:
        return {n for n, e in self.engines.items() if e.state is EngineState.AWAKE}


@dataclass
class Replica:
    agent: CountingAgent
    url: str  # the agent's
    engines: dict[str, str]  # model -> engine base URL
    engine_servers: AsyncExitStack  # closing it stops the engines (the agent stays)

    def endpoint(self, deployment: str, model: str, index: int) -> Endpoint:
        return Endpoint(deployment, index, self.engines[model], ENGINE_KEY, self.url)

    async def asleep_arrivals(self, http: ClientSession, model: str) -> float:
        async with http.get(self.engines[model] + "/metrics") as resp:
            text = await resp.text()
        for line in text.splitlines():
            if line.startswith("hpcserve_enginesim_requests_while_asleep_total "):
                return float(line.split()[1])
        raise AssertionError("the engine simulator shows no requests_while_asleep counter")


@dataclass
class Rig:
    url: str
    admin: str
    http: ClientSession
    state: GatewayState
    samples: list[GatewaySample] = field(default_factory=list)

    async def post(self, model: str, max_tokens: int = 4) -> tuple[int, dict[str, str], Any]:
        body = {"model": model, "prompt": "hello", "max_tokens": max_tokens}
        async with self.http.post(self.url + "/v1/completions", json=body, headers=_auth(KEY)) as resp:
            return resp.status, dict(resp.headers), msgspec.json.decode(await resp.read())

    async def first_token(self, model: str) -> tuple[float, str]:
        """Seconds from sending a streamed request to its first token, and the replica that served it."""
        body = {"model": model, "prompt": "hello", "max_tokens": 4, "stream": True}
        sent = time.monotonic()
        async with self.http.post(self.url + "/v1/completions", json=body, headers=_auth(KEY)) as resp:
            assert resp.status == 200, await resp.text()
            await resp.content.readany()
            ttft = time.monotonic() - sent
            await resp.read()
            return ttft, resp.headers["X-Hpcserve-Replica"]

    async def metrics(self) -> str:
        async with self.http.get(self.admin + "/metrics") as resp:
            return await resp.text()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@asynccontextmanager
async def replica(
    stack: AsyncExitStack, models: list[str], max_awake: int, awake: tuple[str, ...] = (), **sim: Any
) -> AsyncIterator[Replica]:
    """Engine simulators for ``models`` behind a real agent; only ``awake`` stay awake."""
    engines, servers = {}, AsyncExitStack()
    stack.push_async_callback(servers.aclose)
    config = {"enable_sleep_mode": True, "dev_mode": True, "sleep_time_scale": SCALE, "weights_gib": GIB}
    for model in models:
        app = engine_sim.make_app(SimConfig(model=model, api_key=ENGINE_KEY, **(config | sim)))
        engines[model] = await servers.enter_async_context(serving(app))
    agent = CountingAgent(max_awake, key=ENGINE_KEY, host="127.0.0.1", poll_s=0.2)
    runner, port = await serve(agent, "127.0.0.1")
    stack.push_async_callback(runner.cleanup)
    for model in models:
        await asyncio.sleep(0.01)  # distinct last_used: the first added is the least recently used
        await agent.add_engine(model, int(engines[model].rsplit(":", 1)[1]))
    for model in models:
        if model not in awake:
            await agent.sleep(model)
    yield Replica(agent, f"http://127.0.0.1:{port}", engines, servers)


@asynccontextmanager
async def gateway(
    stack: AsyncExitStack, *routes: DeploymentRoute, config: GatewayConfig = FAST
) -> AsyncIterator[Rig]:
    samples: list[GatewaySample] = []
    app = make_app(config, StaticRoutes.of(*routes), keys=KEYS, report=samples.extend)
    url = await stack.enter_async_context(serving(app))
    admin = await stack.enter_async_context(serving(make_admin_app(app)))
    http = await stack.enter_async_context(ClientSession())
    await asyncio.sleep(0.1)
    yield Rig(url, admin, http, app[STATE], samples)


def run(scenario: Callable[[AsyncExitStack], Coroutine[Any, Any, None]]) -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            await scenario(stack)

    asyncio.run(main())


# -- a warm deployment: one replica, one engine asleep -----------------------------------------------------
def test_a_request_to_a_sleeping_model_is_held_while_it_wakes_then_answered() -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        rep = await stack.enter_async_context(replica(stack, ["m"], 1))
        rig = await stack.enter_async_context(
            gateway(stack, DeploymentRoute("m", (rep.endpoint("m", "m", 0),)))
        )
        assert rep.agent.awake() == set()
        ttft, served = await rig.first_token("m")
        assert served == "m/0" and rep.agent.wake_calls == ["m"] and rep.agent.awake() == {"m"}
        assert WAKE_S <= ttft < WAKE_S + 1.0  # the wake counts toward TTFT
        assert await rep.asleep_arrivals(rig.http, "m") == 0  # sent only once awake
        again, _ = await rig.first_token("m")  # awake now: no second wake
        assert rep.agent.wake_calls == ["m"] and again < WAKE_S
        text = await rig.metrics()
        assert metric(text, "wakes_total", model="m", result="woke") == 1
        assert metric(text, "wake_wait_seconds_count", model="m") == 1
        assert metric(text, "wake_wait_seconds_sum", model="m") >= WAKE_S

    run(scenario)


def test_a_key_that_may_not_reach_a_sleeping_model_gets_404_and_never_wakes_it() -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        rep = await stack.enter_async_context(replica(stack, ["m"], 1))
        route = DeploymentRoute("m", (rep.endpoint("m", "m", 0),), owner="alice")
        rig = await stack.enter_async_context(gateway(stack, route))
        body = {"model": "m", "prompt": "hello", "max_tokens": 4}
        async with rig.http.post(rig.url + "/v1/completions", json=body, headers=_auth(BOBS_KEY)) as resp:
            assert resp.status == 404, await resp.text()  # bob's key: alice's model does not exist for it
        assert rep.agent.wake_calls == [] and rep.agent.awake() == set()  # still asleep, no GPU taken
        ttft, _ = await rig.first_token("m")  # alice's own key wakes it
        assert rep.agent.wake_calls == ["m"] and ttft >= WAKE_S

    run(scenario)


def test_concurrent_requests_share_one_wake_call_and_count_as_demand_meanwhile() -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        # ~1.1 s to wake: long enough for the gateway's samples to see the requests held
        rep = await stack.enter_async_context(replica(stack, ["m"], 1, sleep_time_scale=0.5))
        rig = await stack.enter_async_context(
            gateway(stack, DeploymentRoute("m", (rep.endpoint("m", "m", 0),)))
        )
        answers = await asyncio.gather(*(rig.post("m") for _ in range(6)))
        assert [status for status, _, _ in answers] == [200] * 6
        assert rep.agent.wake_calls == ["m"]
        assert await rep.asleep_arrivals(rig.http, "m") == 0
        assert max(s.queued for s in rig.samples if s.deployment == "m") == 6  # held: demand
        assert rig.state.waker.held == {}
        text = await rig.metrics()
        assert metric(text, "wakes_total", model="m", result="woke") == 1
        assert metric(text, "wake_wait_seconds_count", model="m") == 6

    run(scenario)


# -- a pool: several engines per replica, at most max_awake awake ------------------------------------------
def test_a_pool_routes_to_the_replica_where_the_model_is_awake() -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        r0 = await stack.enter_async_context(replica(stack, ["a", "b"], 1, awake=("a",)))
        r1 = await stack.enter_async_context(replica(stack, ["a", "b"], 1, awake=("b",)))
        routes = [DeploymentRoute(m, (r0.endpoint(m, m, 0), r1.endpoint(m, m, 1))) for m in ("a", "b")]
        rig = await stack.enter_async_context(gateway(stack, *routes))
        for _ in range(3):
            assert (await rig.post("a"))[1]["X-Hpcserve-Replica"] == "a/0"
            assert (await rig.post("b"))[1]["X-Hpcserve-Replica"] == "b/1"
        assert r0.agent.wake_calls == r1.agent.wake_calls == []
        assert r0.agent.awake() == {"a"} and r1.agent.awake() == {"b"}

    run(scenario)


def test_a_pool_replica_sleeps_its_least_recently_used_model_to_wake_another() -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        rep = await stack.enter_async_context(replica(stack, ["a", "b", "c", "d"], 2, awake=("a", "b")))
        names = ("a", "b", "c", "d")
        rig = await stack.enter_async_context(
            gateway(stack, *(DeploymentRoute(m, (rep.endpoint(m, m, 0),)) for m in names))
        )
        await rig.post("b")  # b used now: a is the least recently used
        for model, sleeps in (("c", "a"), ("d", "b"), ("a", "c"), ("b", "d")):
            status, _, answer = await rig.post(model)
            assert status == 200 and answer["model"] == model
            awake = rep.agent.awake()
            assert model in awake and sleeps not in awake and len(awake) <= 2, (model, awake)
        assert rep.agent.wake_calls == ["c", "d", "a", "b"]
        for model in names:
            assert await rep.asleep_arrivals(rig.http, model) == 0

    run(scenario)


def test_an_engine_put_to_sleep_under_a_request_in_flight_is_woken_again() -> None:
    """Another gateway, or the service moving the deployment to the warm tier, puts the engine to sleep
    while this gateway's view (up to 1 s old) still says awake: the request sent then is parked in the
    engine, and the replica's agent, seeing it parked, wakes the engine."""

    async def scenario(stack: AsyncExitStack) -> None:
        rep = await stack.enter_async_context(replica(stack, ["m"], 1, awake=("m",)))
        route = DeploymentRoute("m", (rep.endpoint("m", "m", 0),))
        slow_reads = replace(FAST, agent_max_age_s=2.0)  # the race's window, wide enough on a busy machine
        rig = await stack.enter_async_context(gateway(stack, route, config=slow_reads))
        assert (await rig.post("m"))[0] == 200  # the view: awake, fresh
        await rep.agent.sleep("m")  # not through this gateway
        status, _, _ = await rig.post("m")
        assert status == 200 and await rep.asleep_arrivals(rig.http, "m") == 1  # the race, healed
        assert rep.agent.wake_calls == ["m"] and rep.agent.awake() == {"m"}

    run(scenario)


# -- failures ------------------------------------------------------------------------------------------------
def test_a_failed_wake_tries_another_replica_and_with_none_left_answers_503() -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        broken = await stack.enter_async_context(replica(stack, ["m"], 1))
        good = await stack.enter_async_context(replica(stack, ["m"], 1))
        await broken.engine_servers.aclose()  # its engine is gone: the agent's wake fails (502)
        both = DeploymentRoute("m", (broken.endpoint("m", "m", 0), good.endpoint("m", "m", 1)))
        rig = await stack.enter_async_context(gateway(stack, both))
        status, headers, _ = await rig.post("m")
        assert status == 200 and headers["X-Hpcserve-Replica"] == "m/1"
        assert broken.agent.wake_calls == ["m"] and good.agent.wake_calls == ["m"]
        lone = await stack.enter_async_context(
            gateway(stack, DeploymentRoute("m", (broken.endpoint("m", "m", 0),)))
        )
        status, headers, answer = await lone.post("m")
        assert status == 503 and headers["Retry-After"] == str(FAST.retry_after_s)
        assert answer["error"]["code"] == "no_replica_ready" and "could wake" in answer["error"]["message"]
        assert metric(await lone.metrics(), "wakes_total", model="m", result="failed") == 1
        unreachable = Endpoint("m", 2, good.engines["m"], ENGINE_KEY, "http://127.0.0.1:1")  # no agent there
        mute = await stack.enter_async_context(gateway(stack, DeploymentRoute("m", (unreachable,))))
        status, _, answer = await mute.post("m")
        assert status == 503 and "agent answered" in answer["error"]["message"]

    run(scenario)


def test_requests_to_replicas_without_an_agent_never_touch_the_waker() -> None:
    async def scenario(stack: AsyncExitStack) -> None:
        plain = await stack.enter_async_context(serving(engine_sim.make_app(SimConfig(model="p"))))
        rig = await stack.enter_async_context(
            gateway(stack, DeploymentRoute("p", (Endpoint("p", 0, plain),)))
        )
        assert (await rig.post("p"))[0] == 200
        assert rig.state.waker.views == {} and rig.state.waker.wakes == {}

    run(scenario)
