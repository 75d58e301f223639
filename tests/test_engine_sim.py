"""The engine simulator served for real on 127.0.0.1 (ephemeral ports): API shapes, metrics, the latency
model, disconnects, 2,000 concurrent streams, and the SIGTERM drain of the ``hpcserve engine-sim`` CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from click.testing import CliRunner

from hpcserve.cli.engine_cmd import engine_sim
from hpcserve.enginesim.core import SimConfig, step_seconds
from hpcserve.enginesim.openai import ApiError, count_tokens, parse_job
from hpcserve.enginesim.server import OWNED_BY, SimServer, start
from hpcserve.serving.engine_stats import EngineStats, parse_engine_metrics

T = TypeVar("T")
Scenario = Callable[[SimServer, aiohttp.ClientSession], Awaitable[T]]
FAST = SimConfig(model="sim/m", port=0, decode_s_per_token=0.002)


def run_sim(config: SimConfig, scenario: Scenario[T]) -> T:
    async def main() -> T:
        server = await start(config)
        try:
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(server.url, connector=connector) as session:
                return await scenario(server, session)
        finally:
            await server.close()

    return asyncio.run(main())


async def sse(response: aiohttp.ClientResponse) -> list[Any]:
    """The events of a stream: decoded JSON, or the string "[DONE]"."""
    events: list[Any] = []
    async for line in response.content:
        if line.startswith(b"data: "):
            data = line[6:].strip().decode()
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def stats(session: aiohttp.ClientSession) -> EngineStats:
    async with session.get("/metrics") as r:
        return parse_engine_metrics(await r.text())


async def first_token_s(session: aiohttp.ClientSession, body: dict[str, Any]) -> float:
    """Seconds from sending a streamed request to its first token (then reads it to the end)."""
    t0 = time.perf_counter()
    async with session.post("/v1/completions", json={**body, "stream": True}) as r:
        await r.content.readline()
        ttft = time.perf_counter() - t0
        await r.read()
    return ttft


# pure parts ------------------------------------------------------------------------------------------------


def test_latency_model_and_tokenizer() -> None:
    config = SimConfig(model="m", max_batch=10, prefill_tokens_per_s=1000, decode_s_per_token=0.01)
    assert step_seconds(config, 1, 0) == pytest.approx(0.01)
    assert step_seconds(config, 11, 0) == pytest.approx(0.015)  # (1 + 0.5 * 10 / 10) times a lone token
    assert step_seconds(config, 1, 500) == pytest.approx(0.51)
    assert count_tokens("a abcd abcde  x\n") == 5


def test_parse_job_limits_and_errors() -> None:
    config = SimConfig(model="m", max_model_len=20, default_max_tokens=16)
    assert parse_job(b'{"prompt": "one two"}', config, chat=False).limit == 16
    assert parse_job(b'{"prompt": [1, 2, 3, 4, 5, 6, 7, 8]}', config, chat=False).limit == 12
    stop = parse_job(b'{"prompt": "a b c", "stop": ["c"], "max_tokens": 5}', config, chat=False)
    assert (stop.limit, stop.finish_reason) == (2, "stop")
    for body, status in [
        (b'{"prompt": "x", "max_tokens": 20}', 400),  # 1 + 20 > max_model_len
        (b'{"prompt": "x", "max_tokens": 0}', 400),
        (b'{"prompt": "x", "model": "other"}', 404),
        (b'{"prompt": 3}', 400),
        (b"not json", 400),
    ]:
        with pytest.raises(ApiError) as err:
            parse_job(body, config, chat=False)
        assert err.value.status == status


# served ----------------------------------------------------------------------------------------------------


def test_health_503_until_the_startup_delay() -> None:
    async def scenario(server: SimServer, s: aiohttp.ClientSession) -> None:
        async with s.get("/health") as r:
            assert r.status == 503 and r.headers["x-hpcserve-engine"] == "simulator"
        async with s.post("/v1/completions", json={"prompt": "hi"}) as r:
            assert r.status == 503
        await asyncio.sleep(0.35)
        async with s.get("/health") as r:
            assert r.status == 200
        async with s.get("/v1/models") as r:
            model = (await r.json())["data"][0]
            assert (model["id"], model["owned_by"], model["max_model_len"]) == ("sim/m", OWNED_BY, 4096)

    run_sim(SimConfig(model="sim/m", port=0, startup_delay_s=0.3), scenario)


def test_non_streamed_completion_and_chat() -> None:
    async def scenario(server: SimServer, s: aiohttp.ClientSession) -> None:
        async with s.post("/v1/completions", json={"prompt": "alpha beta", "max_tokens": 3}) as r:
            body = await r.json()
        assert body["object"] == "text_completion" and body["model"] == "sim/m"
        assert body["choices"][0] == {"index": 0, "text": " alpha beta alpha", "logprobs": None,
                                      "finish_reason": "length"}  # fmt: skip
        assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
        chat = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 2}
        async with s.post("/v1/chat/completions", json=chat) as r:
            body = await r.json()
        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
        assert body["choices"][0]["message"] == {"role": "assistant", "content": " hello there"}
        assert body["usage"]["completion_tokens"] == 2 and body["usage"]["prompt_tokens"] == 4 + 4
        async with s.post("/v1/completions", json={"prompt": "x " * 5000}) as r:
            assert r.status == 400 and "maximum context length" in (await r.json())["error"]["message"]

    run_sim(FAST, scenario)


def test_streamed_completion_and_chat() -> None:
    async def scenario(server: SimServer, s: aiohttp.ClientSession) -> None:
        body = {"prompt": "a b", "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
        async with s.post("/v1/completions", json=body) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            events = await sse(r)
        assert [e["choices"][0]["text"] for e in events[:4]] == [" a", " b", " a", " b"]
        assert events[4]["choices"][0]["finish_reason"] == "length"
        assert events[5]["choices"] == [] and events[5]["usage"]["completion_tokens"] == 4
        assert events[6] == "[DONE]" and len(events) == 7
        chat = {"messages": [{"role": "user", "content": "w"}], "max_tokens": 3, "stream": True}
        async with s.post("/v1/chat/completions", json=chat) as r:
            events = await sse(r)
        assert events[0]["object"] == "chat.completion.chunk"
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert [e["choices"][0]["delta"] for e in events[1:5]] == [{"content": " w"}] * 3 + [{}]
        assert events[4]["choices"][0]["finish_reason"] == "length" and events[5] == "[DONE]"

    run_sim(FAST, scenario)


def test_metrics_move_under_load() -> None:
    async def scenario(server: SimServer, s: aiohttp.ClientSession) -> None:
        idle = await stats(s)
        assert (idle.running, idle.waiting, idle.kv_usage) == (0, 0, 0.0)
        body = {"prompt": "one two six", "max_tokens": 20}
        load = [asyncio.create_task(s.post("/v1/completions", json=body)) for _ in range(6)]
        busy = await stats(s)
        while busy.running + busy.waiting < 6:  # until all six have arrived
            busy = await stats(s)
        assert (busy.running, busy.waiting) == (2, 4) and busy.kv_usage and busy.kv_usage > 0
        for response in await asyncio.gather(*load):
            assert response.status == 200
            response.release()
        done = await stats(s)
        assert (done.running, done.waiting, done.kv_usage) == (0, 0, 0.0)
        assert (done.prompt_tokens_total, done.generation_tokens_total) == (6 * 3, 6 * 20)
        assert done.ttft_p50 is not None and done.e2e_p95 is not None and done.ttft_buckets[-1][1] == 6

    run_sim(SimConfig(model="sim/m", port=0, max_batch=2, decode_s_per_token=0.01, kv_tokens=1000), scenario)


def test_ttft_grows_with_prompt_length() -> None:
    async def scenario(server: SimServer, s: aiohttp.ClientSession) -> tuple[float, float]:
        short = await first_token_s(s, {"prompt": "hi", "max_tokens": 2})
        long = await first_token_s(s, {"prompt": "abcd " * 3000, "max_tokens": 2})  # 0.3 s of prefill
        return short, long

    short, long = run_sim(SimConfig(model="sim/m", port=0, prefill_tokens_per_s=10_000), scenario)
    assert short < 0.1 and long - short > 0.25


def test_with_one_slot_the_second_request_waits() -> None:
    async def scenario(server: SimServer, s: aiohttp.ClientSession) -> list[float]:
        body = {"prompt": "hi", "max_tokens": 20}
        return sorted(await asyncio.gather(first_token_s(s, body), first_token_s(s, body)))

    first, second = run_sim(SimConfig(model="sim/m", port=0, max_batch=1, decode_s_per_token=0.01), scenario)
    assert second - first > 0.15  # the second waited for the first's 20 steps of 10 ms


def test_disconnect_mid_stream_frees_the_slot() -> None:
    async def scenario(server: SimServer, s: aiohttp.ClientSession) -> None:
        r = await s.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1000, "stream": True})
        await r.content.readline()
        assert (await stats(s)).running == 1
        r.close()  # drops the connection mid-stream
        for _ in range(100):
            if (await stats(s)).running == 0:
                break
            await asyncio.sleep(0.02)
        async with s.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}) as r2:
            assert r2.status == 200
        async with s.get("/metrics") as m:
            assert 'finished_reason="abort",model_name="sim/m"} 1.0' in await m.text()
        assert server.engine.scheduler.load().running == 0

    run_sim(SimConfig(model="sim/m", port=0, max_batch=1, decode_s_per_token=0.01), scenario)


def test_two_thousand_concurrent_streams() -> None:
    async def one(s: aiohttp.ClientSession) -> int:
        async with s.post("/v1/completions", json={"prompt": "a b", "max_tokens": 4, "stream": True}) as r:
            assert r.status == 200
            return len(await sse(r))

    async def scenario(server: SimServer, s: aiohttp.ClientSession) -> None:
        counts = await asyncio.gather(*(one(s) for _ in range(2000)))
        assert counts == [6] * 2000  # 4 tokens, the finish chunk, [DONE]
        done = await stats(s)
        assert done.running == 0 and done.generation_tokens_total == 8000

    run_sim(SimConfig(model="sim/m", port=0, max_batch=256, decode_s_per_token=0.005), scenario)


# the CLI ---------------------------------------------------------------------------------------------------


def test_cli_help_says_simulator_and_checks_the_model() -> None:
    help_text = CliRunner().invoke(engine_sim, ["--help"]).output
    assert "SIMULATOR (not vLLM" in help_text and "--max-num-seqs" in help_text
    result = CliRunner().invoke(engine_sim, ["a", "--model", "b"])
    assert result.exit_code != 0 and "differ" in str(result.exception)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_healthy(s: aiohttp.ClientSession, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(200):
        assert proc.poll() is None, proc.communicate()[1].decode()
        try:
            async with s.get("/health") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    pytest.fail("engine-sim did not become healthy in 10 s")


def test_sigterm_drains_then_exits_zero() -> None:
    port = _free_port()
    argv = [sys.executable, "-m", "hpcserve", "engine-sim", "sim/m", "--port", str(port),
            "--decode-ms-per-token", "20"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    async def scenario() -> list[Any]:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as s:
            await _wait_healthy(s, proc)
            body = {"prompt": "hi", "max_tokens": 40, "stream": True}
            async with s.post("/v1/completions", json=body) as stream:
                first = await stream.content.readline()
                proc.send_signal(signal.SIGTERM)
                while (await s.get("/health")).status != 503:
                    await asyncio.sleep(0.01)
                async with s.post("/v1/completions", json={"prompt": "late"}) as late:
                    assert late.status == 503 and "draining" in (await late.json())["error"]["message"]
                return [json.loads(first[6:]), *await sse(stream)]

    try:
        events = asyncio.run(scenario())
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
    _, err = proc.communicate()
    assert len(events) == 42 and events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert b"SIMULATOR (not vLLM)" in err and b"drained" in err


# the engine key (vLLM's --api-key / VLLM_API_KEY) -------------------------------------------------------

ENGINE_KEY = "engine-key-for-tests"


def test_with_a_key_v1_needs_it_and_health_and_metrics_stay_open() -> None:
    async def scenario(server: SimServer, s: aiohttp.ClientSession) -> None:
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ENGINE_KEY},
                        {"Authorization": f"Bearer {ENGINE_KEY}x"}):  # fmt: skip
            for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/chat/completions", chat),
                                       ("POST", "/v1/completions", {"prompt": "hi"})):  # fmt: skip
                async with s.request(method, path, json=body, headers=headers) as r:
                    error = (await r.json())["error"]
                    assert (r.status, error["code"], error["type"]) == (401, 401, "AuthenticationError")
                    assert r.headers["WWW-Authenticate"] == "Bearer" and ENGINE_KEY not in error["message"]
        good = {"Authorization": f"Bearer {ENGINE_KEY}"}
        async with s.get("/v1/models", headers=good) as r:
            assert r.status == 200 and (await r.json())["data"][0]["id"] == "sim/m"
        async with s.post("/v1/chat/completions", json=chat, headers=good) as r:
            assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 2
        for path in ("/health", "/metrics"):
            async with s.get(path) as r:
                assert r.status == 200, path

    run_sim(SimConfig(model="sim/m", port=0, decode_s_per_token=0.001, api_key=ENGINE_KEY), scenario)
    assert ENGINE_KEY not in repr(SimConfig(model="m", api_key=ENGINE_KEY))


def test_without_a_key_nothing_is_checked() -> None:
    async def scenario(server: SimServer, s: aiohttp.ClientSession) -> None:
        async with s.get("/v1/models", headers={"Authorization": "Bearer anything"}) as r:
            assert r.status == 200

    run_sim(FAST, scenario)


def test_the_cli_takes_the_key_from_vllm_api_key_not_argv() -> None:
    port = _free_port()
    argv = [sys.executable, "-m", "hpcserve", "engine-sim", "sim/m", "--port", str(port)]
    env = {**os.environ, "VLLM_API_KEY": ENGINE_KEY}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)

    async def scenario() -> list[int]:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as s:
            await _wait_healthy(s, proc)
            statuses = []
            for headers in ({}, {"Authorization": f"Bearer {ENGINE_KEY}"}):
                async with s.get("/v1/models", headers=headers) as r:
                    statuses.append(r.status)
            return statuses

    try:
        assert asyncio.run(scenario()) == [401, 200]
        assert ENGINE_KEY.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    _, err = proc.communicate()
    assert b"needs its API key" in err and ENGINE_KEY.encode() not in err
