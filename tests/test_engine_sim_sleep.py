"""Sleep mode in the engine simulator (not vLLM): the pure timing model, then the simulator on 127.0.0.1
(in its own process for the main flow): sleep -> is_sleeping -> a request is held -> wake -> it is served
after the modelled wake time; vllm:engine_sleep_state in each state; the endpoints absent (404) without
VLLM_SERVER_DEV_MODE=1, and refused (500) in dev mode without --enable-sleep-mode, as vLLM does."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hpcserve.enginesim.core import SimConfig
from hpcserve.enginesim.server import start
from hpcserve.enginesim.sleep import SleepError, parse_sleep, parse_tags
from hpcserve.enginesim.timing import (
    GIB,
    SLEEP_TIMINGS,
    sleep_seconds,
    wake_seconds,
    weights_gib,
)
from tests.test_engine_sim import _wait_healthy as wait_healthy

MODEL = "sim/Llama-3.1-8B-Instruct"
GIB_8B = 8e9 * 2 / GIB
SCALE = 0.25
TOLERANCE_S = 0.4  # event-loop and HTTP overhead on a busy 2-core machine, on top of the model

# pure: the timing model ------------------------------------------------------------------------------------


def test_timings_reproduce_the_published_figures() -> None:
    assert wake_seconds(1, 64) == pytest.approx(3.0, abs=0.02)  # ~3 s for 64 GiB of weights
    assert wake_seconds(1, GIB_8B) == pytest.approx(2.2, abs=0.02)  # 2.2 s for an 8B model
    assert sleep_seconds(1, 64) == pytest.approx(10.0, abs=0.05)  # level-1 sleep ~10 s at 64 GiB
    assert sleep_seconds(2, 64) == SLEEP_TIMINGS.discard_s  # level 2 copies nothing
    assert wake_seconds(2, 64) > 3 * wake_seconds(1, 64)  # level 2 reloads from disk


def test_timings_split_by_tag_scale_and_grow_with_weights() -> None:
    both = wake_seconds(1, 20)
    weights = wake_seconds(1, 20, frozenset({"weights"}))
    kv = wake_seconds(1, 20, frozenset({"kv_cache"}))
    assert weights + kv == pytest.approx(both) and kv == SLEEP_TIMINGS.wake_fixed_s
    assert wake_seconds(1, 20, scale=0.1) == pytest.approx(both / 10)
    assert sleep_seconds(1, 70, scale=0.5) == pytest.approx(sleep_seconds(1, 70) / 2)
    assert wake_seconds(1, 140) > wake_seconds(1, 14) and sleep_seconds(1, 140) > sleep_seconds(1, 14)
    with pytest.raises(ValueError, match="level"):
        sleep_seconds(3, 1)
    with pytest.raises(ValueError, match="level"):
        wake_seconds(0, 1)


def test_weight_size_from_the_name_or_the_override() -> None:
    assert weights_gib("meta-llama/Llama-3.1-70B-Instruct") == pytest.approx(70e9 * 2 / GIB)
    assert weights_gib("Qwen/Qwen2.5-0.5B") == pytest.approx(0.5e9 * 2 / GIB)
    assert weights_gib(MODEL) == pytest.approx(GIB_8B)
    assert weights_gib("sim/m") == SLEEP_TIMINGS.default_weights_gib
    assert weights_gib("org/13B-tuned", override=3.5) == 3.5


def test_bad_sleep_and_wake_parameters_name_the_field() -> None:
    assert parse_sleep({}) == (1, "abort")
    assert parse_sleep({"level": "2", "mode": "wait"}) == (2, "wait")
    for query, field in (({"level": "3"}, "level"), ({"level": "x"}, "level"), ({"mode": "keep"}, "mode")):
        with pytest.raises(SleepError, match=f"^{field}:"):
            parse_sleep(query)
    assert parse_tags([]) == frozenset({"weights", "kv_cache"})
    assert parse_tags(["weights"]) == frozenset({"weights"})
    with pytest.raises(SleepError, match=r"^tags: unknown gpu"):
        parse_tags(["weights", "gpu"])


# the simulator on loopback --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawn(*flags: str, dev_mode: bool) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_SERVER_DEV_MODE"}
    if dev_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    argv = [sys.executable, "-m", "hpcserve", "engine-sim", MODEL, "--port", str(port), *flags]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture
def sleepy_sim() -> Iterator[str]:
    proc, url = _spawn(
        "--enable-sleep-mode", "--sleep-time-scale", str(SCALE), "--decode-ms-per-token", "20", dev_mode=True
    )
    try:
        asyncio.run(_wait_healthy(url, proc))
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def _wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession(url) as s:
        await wait_healthy(s, proc)  # test_engine_sim's wait, on a session of its own


async def _metric(s: aiohttp.ClientSession, name: str) -> dict[str, float]:
    """Samples of ``name`` by their most specific label (sleep_state for the sleep gauge)."""
    async with s.get("/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[sample.labels.get("sleep_state", "")] = sample.value
    return out


async def _sleep_state(s: aiohttp.ClientSession) -> dict[str, float]:
    return await _metric(s, "vllm:engine_sleep_state")


async def _is_sleeping(s: aiohttp.ClientSession) -> bool:
    async with s.get("/is_sleeping") as r:
        assert r.status == 200
        return bool((await r.json())["is_sleeping"])


async def _timed_post(s: aiohttp.ClientSession, path: str) -> float:
    t0 = time.perf_counter()
    async with s.post(path) as r:
        assert r.status == 200, await r.text()
    return time.perf_counter() - t0


AWAKE = {"awake": 1.0, "weights_offloaded": 0.0, "discard_all": 0.0}
LEVEL1 = {"awake": 0.0, "weights_offloaded": 1.0, "discard_all": 0.0}
LEVEL2 = {"awake": 0.0, "weights_offloaded": 0.0, "discard_all": 1.0}


def test_sleep_holds_requests_and_wake_serves_them_after_the_modelled_time(sleepy_sim: str) -> None:
    async def scenario() -> None:
        async with aiohttp.ClientSession(sleepy_sim) as s:
            assert await _sleep_state(s) == AWAKE and not await _is_sleeping(s)
            # a running stream is aborted by a default (mode=abort) level-1 sleep
            stream = {"prompt": "a b", "max_tokens": 400, "stream": True}
            async with s.post("/v1/completions", json=stream) as st:
                await st.content.readline()
                took = await _timed_post(s, "/sleep?level=1")
                tail = (await st.read()).decode()
            assert '"finish_reason":"abort"' in tail and tail.rstrip().endswith("[DONE]")
            assert took >= sleep_seconds(1, GIB_8B, SCALE) - 0.05
            assert took < sleep_seconds(1, GIB_8B, SCALE) + TOLERANCE_S
            assert await _is_sleeping(s) and await _sleep_state(s) == LEVEL1
            assert (await s.get("/health")).status == 200
            # a request to the sleeping engine is held, not served and not refused
            held = asyncio.create_task(_complete(s))
            await asyncio.sleep(0.5)
            assert not held.done() and (await _metric(s, "vllm:num_requests_waiting"))[""] == 1
            t0 = time.perf_counter()
            wake_took = await _timed_post(s, "/wake_up")
            body = await held
            served_after = time.perf_counter() - t0
            modelled = wake_seconds(1, GIB_8B, scale=SCALE)
            assert modelled - 0.05 <= wake_took < modelled + TOLERANCE_S
            assert modelled - 0.05 <= served_after < modelled + TOLERANCE_S
            assert body["choices"][0]["finish_reason"] == "length"
            assert not await _is_sleeping(s) and await _sleep_state(s) == AWAKE

    asyncio.run(scenario())


def test_level2_and_partial_wake_by_tags(sleepy_sim: str) -> None:
    async def scenario() -> None:
        async with aiohttp.ClientSession(sleepy_sim) as s:
            async with s.post("/sleep?level=3") as r:
                assert r.status == 400 and "level" in (await r.json())["error"]["message"]
            await _timed_post(s, "/sleep?level=2")
            assert await _is_sleeping(s) and await _sleep_state(s) == LEVEL2
            took = await _timed_post(s, "/wake_up?tags=weights")
            assert took >= wake_seconds(2, GIB_8B, frozenset({"weights"}), SCALE) - 0.05
            assert await _is_sleeping(s) and await _sleep_state(s) == LEVEL2  # kv_cache still asleep
            await _timed_post(s, "/wake_up?tags=kv_cache")
            assert not await _is_sleeping(s) and await _sleep_state(s) == AWAKE
            assert (await _complete(s))["choices"][0]["text"]

    asyncio.run(scenario())


async def _complete(s: aiohttp.ClientSession, max_tokens: int = 2) -> Any:
    async with s.post("/v1/completions", json={"prompt": "hello there", "max_tokens": max_tokens}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def test_mode_wait_lets_running_requests_finish_in_process() -> None:
    config = SimConfig(model=MODEL, port=0, enable_sleep_mode=True, dev_mode=True, sleep_time_scale=0.05,
                       decode_s_per_token=0.01)  # fmt: skip

    async def scenario() -> None:
        server = await start(config)
        try:
            async with aiohttp.ClientSession(server.url) as s:
                running = asyncio.create_task(_complete(s, max_tokens=30))
                await asyncio.sleep(0.1)
                await _timed_post(s, "/sleep?level=1&mode=wait")
                assert running.done()  # the sleep waited for it
                assert (await running)["choices"][0]["finish_reason"] == "length"
                assert await _is_sleeping(s)
        finally:
            await server.close()

    asyncio.run(scenario())


def test_endpoints_absent_without_dev_mode() -> None:
    proc, url = _spawn("--enable-sleep-mode", dev_mode=False)

    async def scenario() -> None:
        await _wait_healthy(url, proc)
        async with aiohttp.ClientSession(url) as s:
            for method, path in (("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/is_sleeping")):
                async with s.request(method, path) as r:
                    assert r.status == 404, (method, path)
            assert await _sleep_state(s) == AWAKE  # vLLM exports the gauge either way
            assert (await _complete(s))["choices"][0]["finish_reason"] == "length"

    try:
        asyncio.run(scenario())
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_dev_mode_without_sleep_mode_refuses_as_vllm_does() -> None:
    config = SimConfig(model=MODEL, port=0, dev_mode=True)

    async def scenario() -> None:
        server = await start(config)
        try:
            async with aiohttp.ClientSession(server.url) as s:
                for path in ("/sleep", "/wake_up"):
                    async with s.post(path) as r:
                        assert r.status == 500
                        assert "--enable-sleep-mode" in (await r.json())["error"]["message"]
                assert not await _is_sleeping(s) and await _sleep_state(s) == AWAKE
                assert (await _complete(s))["choices"][0]["finish_reason"] == "length"
        finally:
            await server.close()

    asyncio.run(scenario())
