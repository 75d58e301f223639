"""Overload end to end: the gateway in process on 127.0.0.1, engine simulators as the replicas (in process
where only counts matter; an ``hpcserve engine-sim`` process where latency is measured, so the flood's
engine work does not share the test's event loop).

- a saturated deployment at max_replicas sheds batch requests first, with a Retry-After that follows the
  measured drain rate (two engine speeds, two different values, each ceil(position / rate));
- interactive TTFT p99 under a batch flood stays within 2x of the unloaded p99 (and without the gateway's
  queue, the same flood makes it far worse);
- the fallback serves keys that allow it (the answer names the fallback's model) and never others;
- max_tokens is capped while requests wait, and only then.
"""

from __future__ import annotations

import asyncio
import math
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from aiohttp import ClientSession, web

from hpcserve.enginesim import server as engine_sim
from hpcserve.enginesim.core import SimConfig
from hpcserve.model.gateway import ApiKey, DeploymentRoute, Endpoint, Overload
from hpcserve.serving.gateway import GatewayConfig, StaticRoutes, hash_key, make_admin_app, make_app
from hpcserve.serving.gateway.app import STATE
from hpcserve.serving.gateway.state import GatewayState
from tests.test_gateway import serving

INTERACTIVE, BATCH, FALLBACK, NARROW = "sk-interactive", "sk-batch", "sk-fallback", "sk-narrow"
KEYS = [
    ApiKey("inter", "alice", hash_key(INTERACTIVE)),
    ApiKey("batch", "alice", hash_key(BATCH), priority="batch"),
    ApiKey("fb", "alice", hash_key(FALLBACK), allow_fallback=True),
    ApiKey("narrow", "alice", hash_key(NARROW), models=frozenset({"big"}), allow_fallback=True),
]
FAST = GatewayConfig(refresh_interval_s=0.05, report_interval_s=0.1, usage_flush_interval_s=0.1)


@dataclass
class Rig:
    url: str
    admin: str
    http: ClientSession
    state: GatewayState

    async def post(self, key: str, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        headers = {"Authorization": f"Bearer {key}"}
        async with self.http.post(self.url + "/v1/completions", json=body, headers=headers) as resp:
            raw = await resp.read()
            return resp.status, dict(resp.headers), msgspec.json.decode(raw)

    async def metrics(self) -> str:
        async with self.http.get(self.admin + "/metrics") as resp:
            return await resp.text()


@asynccontextmanager
async def gateway(*routes: DeploymentRoute) -> AsyncIterator[Rig]:
    app = make_app(FAST, StaticRoutes.of(*routes), keys=KEYS)
    async with serving(app) as url, serving(make_admin_app(app)) as admin, ClientSession() as http:
        await asyncio.sleep(0.1)
        yield Rig(url, admin, http, app[STATE])


def sim(name: str, **config: Any) -> web.Application:
    return engine_sim.make_app(SimConfig(model=name, **config))


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of /metrics (0 when absent), its labels in any order."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        family, _, rest = head.partition("{")
        if family == f"hpcserve_gateway_{name}" and set(rest.rstrip("}").split(",")) == want:
            return float(value)
    return 0.0


# -- shedding, batch first, Retry-After from the drain rate ----------------------------------------------
SHED = Overload(max_concurrency=4, interactive_reserve=1, shed_wait_s=2.0, max_replicas=1)


async def shed_run(decode_s: float) -> tuple[int, int, list[int]]:
    """A burst of 30 batch requests before anything finished (the rate unknown: all wait), then, once 3
    have finished, one more batch request and three interactive ones. Returns the probe's Retry-After,
    ceil(position / rate) the gate was at when it arrived, and the Retry-Afters of queued batch requests
    shed for it."""
    async with serving(sim("m", max_batch=4, decode_s_per_token=decode_s)) as up, gateway(
        DeploymentRoute("m", (Endpoint("m", 0, up),), overload=SHED)
    ) as rig:  # fmt: skip
        body = {"model": "m", "prompt": "write", "max_tokens": 20}
        burst = [asyncio.create_task(rig.post(BATCH, body)) for _ in range(30)]
        lane = rig.state.gate.lane("m")
        await until(lambda: lane.service.samples >= 3)
        rate = rig.state.gate.rate("m")
        assert rate is not None
        expected = math.ceil((rig.state.gate.waiting("m") + 1) / rate)
        status, headers, answer = await rig.post(BATCH, body)
        assert status == 503 and answer["error"]["code"] == "overloaded", answer
        interactive = await asyncio.gather(*(rig.post(INTERACTIVE, body) for _ in range(3)))
        assert [s for s, _, _ in interactive] == [200, 200, 200]  # none refused while batch is shed
        answers = await asyncio.gather(*burst)
        evicted = [int(h["Retry-After"]) for s, h, _ in answers if s == 503]
        assert evicted and all(s in (200, 503) for s, _, _ in answers)
        text = await rig.metrics()
        assert metric(text, "shed_total", model="m", priority="batch", reason="overload") == 1
        assert metric(text, "shed_total", model="m", priority="batch", reason="evicted") == len(evicted)
        shed_lines = [line for line in text.splitlines() if line.startswith("hpcserve_gateway_shed_total{")]
        assert shed_lines and not [line for line in shed_lines if 'priority="interactive"' in line]
        return int(headers["Retry-After"]), expected, evicted


def test_saturated_at_max_replicas_sheds_batch_first_with_a_retry_after_from_the_drain_rate() -> None:
    async def scenario() -> None:
        slow = await shed_run(0.05)  # ~1.3 s a request, 3 batch slots: ~2.4 requests/s
        fast = await shed_run(0.0125)  # four times as fast
        print(f"Retry-After: slow engine {slow[0]} s (gate: {slow[1]}), fast {fast[0]} s (gate: {fast[1]}); "
              f"evicted slow {sorted(set(slow[2]))}, fast {sorted(set(fast[2]))}")  # fmt: skip
        for probe, expected, evicted in (slow, fast):
            assert abs(probe - expected) <= 1  # a request may finish between reading the gate and asking
            assert max(evicted) <= probe + 1
        assert slow[0] >= fast[0] + 3  # the slower drain asks clients to wait longer

    run(scenario)


# -- interactive TTFT under a batch flood ---------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def engine_process(name: str, *flags: str) -> AsyncIterator[str]:
    """``hpcserve engine-sim`` in its own process, healthy."""
    port = free_port()
    argv = [sys.executable, "-m", "hpcserve", "engine-sim", name, "--port", str(port), *flags]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        async with ClientSession() as http:
            for _ in range(400):
                try:
                    async with http.get(url + "/health") as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    pass
                await asyncio.sleep(0.05)
            else:
                pytest.fail("engine-sim did not become healthy in 20 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


PROMPT = " ".join(["word"] * 400)  # 400 simulated tokens: 50 ms of prefill at 8000 tokens/s


async def ttft(rig: Rig, model: str) -> float:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 2, "stream": True}
    started = time.perf_counter()
    async with rig.http.post(rig.url + "/v1/completions", json=body,
                             headers={"Authorization": f"Bearer {INTERACTIVE}"}) as resp:  # fmt: skip
        assert resp.status == 200
        await resp.content.readany()
        first = time.perf_counter() - started
        await resp.read()
    return first


async def ttfts(rig: Rig, model: str, n: int) -> list[float]:
    return [await ttft(rig, model) for _ in range(n)]


@asynccontextmanager
async def flood(rig: Rig, model: str, clients: int) -> AsyncIterator[None]:
    """``clients`` batch clients, each sending one long request after another."""
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            await rig.post(BATCH, {"model": model, "prompt": "summarise", "max_tokens": 50})

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    try:
        yield
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def test_interactive_ttft_p99_stays_within_2x_of_unloaded_under_a_batch_flood() -> None:
    flags = ("--max-num-seqs", "8", "--decode-ms-per-token", "20")
    bounded = Overload(max_concurrency=8, interactive_reserve=2, max_replicas=1)

    async def scenario() -> None:
        async with engine_process("m", *flags) as up, engine_process("raw", *flags) as raw_up, gateway(
            DeploymentRoute("m", (Endpoint("m", 0, up),), overload=bounded),
            DeploymentRoute("raw", (Endpoint("raw", 0, raw_up),)),  # no bound: today's gateway
        ) as rig:  # fmt: skip
            await ttfts(rig, "m", 5)  # warm connections
            unloaded = await ttfts(rig, "m", 60)
            async with flood(rig, "m", 40):
                await until(lambda: rig.state.gate.waiting("m", "batch") >= 20)
                loaded = await ttfts(rig, "m", 60)
                assert rig.state.gate.waiting("m", "batch") >= 20  # still saturated by batch
            async with flood(rig, "raw", 40):
                await asyncio.sleep(1.5)
                unqueued = await ttfts(rig, "raw", 3)
        base, under, raw = p99(unloaded), p99(loaded), statistics.median(unqueued)
        print(f"interactive TTFT p99: unloaded {base * 1000:.1f} ms, under a batch flood "
              f"{under * 1000:.1f} ms ({under / base:.2f}x); without the gateway's queue, median "
              f"{raw * 1000:.0f} ms ({raw / base:.1f}x)")  # fmt: skip
        assert under <= 2 * base
        assert raw > 2 * base  # the flood does saturate the engine: priority is what keeps TTFT

    run(scenario)


# -- fallback ---------------------------------------------------------------------------------------------
def test_the_fallback_serves_keys_that_allow_it_and_never_others() -> None:
    big = Overload(max_concurrency=2, max_replicas=1, fallback="small", fallback_wait_s=0.3)

    async def scenario() -> None:
        async with serving(sim("big", max_batch=2, decode_s_per_token=0.04)) as big_up, serving(
            sim("small", decode_s_per_token=0.001)
        ) as small_up, gateway(
            DeploymentRoute("big", (Endpoint("big", 0, big_up),), overload=big),
            DeploymentRoute("small", (Endpoint("small", 0, small_up),)),
        ) as rig:  # fmt: skip
            body = {"model": "big", "prompt": "hi", "max_tokens": 10}
            await asyncio.gather(*(rig.post(INTERACTIVE, body) for _ in range(2)))  # the rate is known
            calm = await rig.post(FALLBACK, body)
            assert calm[0] == 200 and calm[2]["model"] == "big" and "X-Hpcserve-Fallback" not in calm[1]
            busy = [asyncio.create_task(rig.post(INTERACTIVE, body)) for _ in range(6)]
            await until(lambda: rig.state.gate.waiting("big") >= 4)
            status, headers, answer = await rig.post(FALLBACK, body)
            assert status == 200 and answer["model"] == "small"
            assert headers["X-Hpcserve-Fallback"] == "big -> small"
            others = await asyncio.gather(rig.post(INTERACTIVE, body), rig.post(NARROW, body))
            for status, headers, answer in others:  # no fallback allowed / "small" not reachable: waits
                assert status == 200 and answer["model"] == "big" and "X-Hpcserve-Fallback" not in headers
            await asyncio.gather(*busy)
            text = await rig.metrics()
            assert metric(text, "fallback_total", model="big", fallback="small") == 1

    run(scenario)


# -- max_tokens capped under overload only --------------------------------------------------------------
def test_max_tokens_is_capped_while_requests_wait_and_only_then() -> None:
    capped = Overload(max_concurrency=1, max_replicas=1, max_tokens=4)

    async def scenario() -> None:
        async with serving(sim("m", decode_s_per_token=0.01)) as up, gateway(
            DeploymentRoute("m", (Endpoint("m", 0, up),), overload=capped)
        ) as rig:  # fmt: skip
            ask = {"model": "m", "prompt": "hi", "max_tokens": 30}
            status, headers, answer = await rig.post(INTERACTIVE, ask)
            assert status == 200 and answer["usage"]["completion_tokens"] == 30
            assert "X-Hpcserve-Max-Tokens" not in headers
            long = asyncio.create_task(rig.post(INTERACTIVE, {**ask, "max_tokens": 100}))
            await until(lambda: rig.state.gate.lane("m").held["interactive"] == 1)
            queued = asyncio.create_task(rig.post(INTERACTIVE, ask))
            await until(lambda: rig.state.gate.waiting("m") == 1)
            status, headers, answer = await rig.post(INTERACTIVE, ask)  # arrives while one waits
            assert status == 200 and answer["usage"]["completion_tokens"] == 4
            assert headers["X-Hpcserve-Max-Tokens"] == "4; clamped; overload"
            assert (await long)[2]["usage"]["completion_tokens"] == 100  # sent before any wait
            assert (await queued)[2]["usage"]["completion_tokens"] == 30  # arrived to an empty queue
            status, headers, answer = await rig.post(INTERACTIVE, ask)  # calm again
            assert answer["usage"]["completion_tokens"] == 30 and "X-Hpcserve-Max-Tokens" not in headers
            assert metric(await rig.metrics(), "overload_capped_total", model="m") == 1

    run(scenario)
