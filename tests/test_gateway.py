"""The gateway, in process on 127.0.0.1 ephemeral ports, in front of tiny upstreams
(tests/gateway_upstream.py); one test kills a real upstream process mid-stream, one runs against the
engine simulator."""

from __future__ import annotations

import asyncio
import logging
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import ClientSession, web

from hpcserve.serving.gateway import (
    ApiKey,
    DeploymentRoute,
    Endpoint,
    GatewayConfig,
    GatewaySample,
    StaticRoutes,
    UsageRow,
    hash_key,
    make_admin_app,
    make_app,
)
from hpcserve.serving.gateway.app import GATEWAY, STATE
from tests.gateway_upstream import USAGE_PROMPT, Upstream, upstream_app

KEY, CAPPED, SLOW = "sk-test-key", "sk-capped-key", "sk-slow-key"
KEYS = [
    ApiKey("k1", "alice", hash_key(KEY)),
    ApiKey("capped", "bob", hash_key(CAPPED), max_tokens=16),
    ApiKey("slow", "carol", hash_key(SLOW), rate=1.0, burst=20.0),
]
FAST = GatewayConfig(
    refresh_interval_s=0.05, report_interval_s=0.1, usage_flush_interval_s=0.1, buffer_timeout_s=5
)
UPSTREAM_SCRIPT = Path(__file__).with_name("gateway_upstream.py")


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)  # as run_gateway runs it
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@dataclass
class Rig:
    url: str
    admin: str  # /metrics and the detailed /health (the admin address)
    routes: StaticRoutes
    ups: list[Upstream]
    up_urls: list[str]
    http: ClientSession
    app: web.Application
    samples: list[GatewaySample] = field(default_factory=list)
    rows: list[UsageRow] = field(default_factory=list)

    def endpoints(self, *which: int) -> tuple[Endpoint, ...]:
        return tuple(Endpoint("m", i, self.up_urls[i]) for i in which)

    async def post(
        self, body: dict[str, Any] | bytes, key: str | None = KEY, path: str = "/v1/completions"
    ) -> tuple[int, dict[str, str], Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = body if isinstance(body, bytes) else msgspec.json.encode(body)
        async with self.http.post(self.url + path, data=data, headers=headers) as resp:
            raw = await resp.read()
            parsed = msgspec.json.decode(raw) if resp.content_type == "application/json" else raw
            return resp.status, dict(resp.headers), parsed


@asynccontextmanager
async def rig(
    replicas: int = 1, config: GatewayConfig = FAST, ready: tuple[int, ...] | None = None, **route: Any
) -> AsyncIterator[Rig]:
    ups = [Upstream(name=f"up{i}") for i in range(replicas)]
    async with _nested([serving(upstream_app(u)) for u in ups]) as up_urls:
        routes = StaticRoutes()
        samples: list[GatewaySample] = []
        rows: list[UsageRow] = []
        app = make_app(config, routes, keys=KEYS, report=samples.extend, usage_sink=rows.extend)
        async with serving(app) as url, serving(make_admin_app(app)) as admin, ClientSession() as http:
            r = Rig(url, admin, routes, ups, up_urls, http, app, samples, rows)
            routes.set(
                DeploymentRoute("m", r.endpoints(*(range(replicas) if ready is None else ready)), **route)
            )
            await asyncio.sleep(0.1)  # a refresh
            yield r


@asynccontextmanager
async def _nested(managers: list[Any]) -> AsyncIterator[list[str]]:
    if not managers:
        yield []
        return
    async with managers[0] as first, _nested(managers[1:]) as rest:
        yield [first, *rest]


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def test_missing_or_bad_key_is_401() -> None:
    async def scenario() -> None:
        async with rig() as r:
            for key in (None, "sk-wrong"):
                status, _, body = await r.post({"model": "m", "prompt": "hi"}, key=key)
                assert status == 401 and body["error"]["type"] == "authentication_error"
            async with r.http.get(r.url + "/v1/models") as resp:
                assert resp.status == 401
            async with r.http.get(r.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}) as resp:
                assert [m["id"] for m in (await resp.json())["data"]] == ["m"]

    run(scenario)


def test_bad_requests_are_400_and_unknown_model_404() -> None:
    async def scenario() -> None:
        cases: list[tuple[dict[str, Any] | bytes, int, str]] = [
            (b"{not json", 400, "invalid_json"),
            (b"[1, 2]", 400, "invalid_json"),
            ({"prompt": "hi"}, 400, "missing_model"),
            ({"model": "m", "prompt": "hi", "max_tokens": "lots"}, 400, "invalid_type"),
            ({"model": "m", "prompt": "hi", "stream": "true"}, 400, "invalid_type"),
            ({"model": "nope", "prompt": "hi"}, 404, "model_not_found"),
        ]
        async with rig() as r:
            for body, status, code in cases:
                got, _, answer = await r.post(body)
                assert (got, answer["error"]["code"]) == (status, code)
                assert set(answer["error"]) == {"message", "type", "param", "code"}

    run(scenario)


def test_oversized_prompt_is_413_before_any_replica() -> None:
    async def scenario() -> None:
        async with rig(max_prompt_tokens=10) as r:
            status, _, body = await r.post({"model": "m", "prompt": "x" * 100})
            assert status == 413 and body["error"]["code"] == "prompt_too_long"
            chat = {
                "model": "m",
                "messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 80}]}],
            }
            assert (await r.post(chat, path="/v1/chat/completions"))[0] == 413
            assert (await r.post({"model": "m", "prompt": "short"}))[0] == 200
            assert len(r.ups[0].bodies) == 1

    run(scenario)


def test_max_tokens_clamped_to_the_keys_cap_and_said_so() -> None:
    async def scenario() -> None:
        async with rig(max_tokens=64) as r:
            status, headers, _ = await r.post({"model": "m", "prompt": "hi", "max_tokens": 1000}, key=CAPPED)
            assert status == 200 and headers["X-Hpcserve-Max-Tokens"] == "16; clamped"
            await r.post({"model": "m", "prompt": "hi"})  # absent: set to the deployment's cap
            _, headers, _ = await r.post({"model": "m", "prompt": "hi", "max_tokens": 8}, key=CAPPED)
            assert "X-Hpcserve-Max-Tokens" not in headers
            assert [b.get("max_tokens") for b in r.ups[0].bodies] == [16, 64, 8]

    run(scenario)


def test_oversized_answer_is_502_and_a_slow_body_408(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        config = GatewayConfig(
            refresh_interval_s=0.05, max_upstream_body_bytes=200, client_body_timeout_s=0.3
        )
        async with rig(config=config) as r:
            r.ups[0].chunks = 40  # a ~260-byte answer (3 chunks: ~115 bytes)
            status, _, body = await r.post({"model": "m", "prompt": "hi"})
            assert status == 502 and "larger than 200 bytes" in body["error"]["message"]
            r.ups[0].chunks = 3
            again = await r.post({"model": "m", "prompt": "hi"})
            assert again[0] == 200, again  # the pool still works
            host, port = r.url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                         + b"\r\nContent-Length: 100\r\n\r\n{\"model\"")  # fmt: skip
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
            writer.close()
            assert head.startswith(b"HTTP/1.1 408")

    with caplog.at_level("WARNING", logger="hpcserve.serving.gateway.proxy"):
        run(scenario)
    lines = [r.getMessage() for r in caplog.records]
    assert any("answered 502" in line for line in lines) and any(" 408 " in line for line in lines)
    assert not any(r.exc_info for r in caplog.records)


def test_rate_limit_is_429_with_retry_after() -> None:
    now = [1000.0]

    async def scenario() -> None:
        app = make_app(FAST, StaticRoutes.of(DeploymentRoute("m")), keys=KEYS, clock=lambda: now[0])
        async with serving(app) as url, ClientSession() as http:
            body = msgspec.json.encode({"model": "m", "prompt": "abcd" * 4, "max_tokens": 16})  # costs 4 + 16
            headers = {"Authorization": f"Bearer {SLOW}"}
            app[STATE].keyring.take(KEYS[2], 20, now[0])  # the bucket (burst 20, 1 token/s) is now empty
            async with http.post(url + "/v1/completions", data=body, headers=headers) as resp:
                assert resp.status == 429 and resp.headers["Retry-After"] == "20"
                assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"
            now[0] += 15
            async with http.post(url + "/v1/completions", data=body, headers=headers) as resp:
                assert resp.headers["Retry-After"] == "5"

    run(scenario)


def test_least_outstanding_routing_skips_draining() -> None:
    async def scenario() -> None:
        async with rig(replicas=3) as r:
            r.routes.set(DeploymentRoute("m", r.endpoints(0, 1, 2), draining=frozenset({2})))
            await asyncio.sleep(0.1)
            hold = asyncio.Event()
            for up in r.ups:
                up.hold = hold
            tasks = [asyncio.create_task(r.post({"model": "m", "prompt": "hi"})) for _ in range(6)]
            await asyncio.sleep(0.3)
            assert [u.active for u in r.ups] == [3, 3, 0]
            hold.set()
            replicas = sorted([(await t)[1]["X-Hpcserve-Replica"] for t in tasks])
            assert replicas == ["m/0"] * 3 + ["m/1"] * 3
            assert r.app[STATE].outstanding == {}

    run(scenario)


def test_stream_passthrough_is_byte_identical() -> None:
    async def scenario() -> None:
        async with rig() as r:
            for extra in ({}, {"stream_options": {"include_usage": True}}):
                body = msgspec.json.encode({"model": "m", "prompt": "hi", "stream": True, **extra})
                async with r.http.post(r.up_urls[0] + "/v1/completions", data=body) as resp:
                    direct = await resp.read()
                headers = {"Authorization": f"Bearer {KEY}"}
                async with r.http.post(r.url + "/v1/completions", data=body, headers=headers) as resp:
                    assert resp.headers["Content-Type"] == "text/event-stream"
                    chunks = [c async for c, _ in resp.content.iter_chunks()]
                assert b"".join(chunks) == direct and len(chunks) > 1
                assert (b'"usage"' in direct) == bool(extra)
            assert r.ups[0].bodies[1]["stream_options"] == {"include_usage": True}  # asked for the client

    run(scenario)


def test_buffered_at_zero_then_answered_when_a_replica_appears() -> None:
    async def scenario() -> None:
        async with rig(ready=()) as r:
            tasks = [asyncio.create_task(r.post({"model": "m", "prompt": f"q{i}"})) for i in range(3)]
            await asyncio.sleep(0.3)
            assert not any(t.done() for t in tasks)
            assert r.samples[-1].buffered == 3 and r.samples[-1].deployment == "m"
            async with r.http.get(r.admin + "/metrics") as resp:
                assert 'hpcserve_gateway_buffered_requests{model="m"} 3.0' in await resp.text()
            r.routes.set(DeploymentRoute("m", r.endpoints(0)))
            assert [(await t)[0] for t in tasks] == [200, 200, 200]
            assert [b["prompt"] for b in r.ups[0].bodies] == ["q0", "q1", "q2"]  # first in, first out
            await asyncio.sleep(0.2)
            assert r.samples[-1].buffered == 0

    run(scenario)


def test_buffer_timeout_and_full_are_503_with_retry_after() -> None:
    async def scenario() -> None:
        config = GatewayConfig(refresh_interval_s=0.05, buffer_timeout_s=0.3, buffer_max=2, retry_after_s=7)
        async with rig(config=config, ready=()) as r:
            started = time.monotonic()
            results = await asyncio.gather(*(r.post({"model": "m", "prompt": "hi"}) for _ in range(3)))
            codes = sorted((s, b["error"]["code"], h["Retry-After"]) for s, h, b in results)
            assert codes == [(503, "buffer_full", "7")] + [(503, "no_replica_ready", "7")] * 2
            assert 0.3 <= time.monotonic() - started < 2

    run(scenario)


def test_refused_connection_is_retried_on_another_replica() -> None:
    async def scenario() -> None:
        async with rig() as r:
            dead = Endpoint("m", 9, "http://127.0.0.1:1")
            r.routes.set(DeploymentRoute("m", (dead, *r.endpoints(0))))
            await asyncio.sleep(0.1)
            assert [(await r.post({"model": "m", "prompt": "hi"}))[0] for _ in range(4)] == [200] * 4
            r.routes.set(DeploymentRoute("m", (dead,)))
            await asyncio.sleep(0.1)
            status, _, body = await r.post({"model": "m", "prompt": "hi"})
            assert status == 502 and body["error"]["code"] == "upstream_unreachable"

    run(scenario)


async def _kill_mid_stream(http: ClientSession, gw: str, proc: subprocess.Popen[str]) -> None:
    body = {"model": "m", "prompt": "hi", "stream": True}
    async with http.post(
        gw + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as resp:
        assert resp.status == 200
        first = await resp.content.readany()
        proc.kill()
        rest = await asyncio.wait_for(resp.read(), 5)
    events = (first + rest).split(b"\n\n")
    assert events[0].startswith(b"data: {") and events[-1] == b""
    assert msgspec.json.decode(events[-2][6:])["error"]["code"] == "upstream_broken"


async def _kill_mid_answer(http: ClientSession, gw: str, proc: subprocess.Popen[str]) -> None:
    body = {"model": "m", "prompt": "hi"}
    answer = asyncio.create_task(
        http.post(gw + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    )
    await asyncio.sleep(0.5)  # the replica has sent half its answer and stalls
    proc.kill()
    async with await asyncio.wait_for(answer, 5) as resp:
        assert resp.status == 502 and (await resp.json())["error"]["type"] == "upstream_error"


@pytest.mark.parametrize("relay", [_kill_mid_stream, _kill_mid_answer])
def test_upstream_killed_mid_answer_gives_a_clean_error_within_5s(
    relay: Callable[[ClientSession, str, subprocess.Popen[str]], Awaitable[None]],
) -> None:
    async def scenario() -> None:
        proc = subprocess.Popen(
            [sys.executable, str(UPSTREAM_SCRIPT), "--stall"], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None
            url = f"http://127.0.0.1:{proc.stdout.readline().strip()}"
            routes = StaticRoutes.of(DeploymentRoute("m", (Endpoint("m", 0, url),)))
            async with serving(make_app(FAST, routes, keys=KEYS)) as gw, ClientSession() as http:
                started = time.monotonic()
                await relay(http, gw, proc)
                assert time.monotonic() - started < 6
        finally:
            proc.kill()
            proc.wait()

    run(scenario)


def test_client_going_away_closes_the_replicas_connection() -> None:
    async def scenario() -> None:
        async with rig() as r:
            r.ups[0].stall = True  # two events, then silence
            body = {"model": "m", "prompt": "hi", "stream": True}
            resp = await r.http.post(
                r.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
            )
            await resp.content.readany()
            state = r.app[STATE]
            assert state.outstanding == {r.up_urls[0]: 1}
            resp.close()  # the client hangs up
            for _ in range(50):
                await asyncio.sleep(0.02)
                if not state.outstanding:
                    break
            assert state.outstanding == {} and state.stats.ledgers[("k1", "m")].codes == {"499": 1}
            assert r.ups[0].active == 0  # the replica saw its connection close and stopped

    run(scenario)


def test_usage_counted_per_key_and_sent_to_the_sink() -> None:
    async def scenario() -> None:
        async with rig() as r:
            await r.post({"model": "m", "prompt": "hi"})
            headers = {"Authorization": f"Bearer {CAPPED}"}
            body = msgspec.json.encode({"model": "m", "prompt": "hi", "stream": True})
            async with r.http.post(r.url + "/v1/completions", data=body, headers=headers) as resp:
                assert b'"usage"' not in await resp.read()  # asked upstream, stripped for the client
            await asyncio.sleep(0.3)
            used = {
                (row.key_id, row.owner): (row.requests, row.prompt_tokens, row.completion_tokens)
                for row in r.rows
            }
            assert used == {("k1", "alice"): (1, USAGE_PROMPT, 3), ("capped", "bob"): (1, USAGE_PROMPT, 3)}
            async with r.http.get(r.admin + "/metrics") as resp:
                text = await resp.text()
            assert 'hpcserve_gateway_completion_tokens_total{key="capped",model="m"} 3.0' in text
            assert 'hpcserve_gateway_requests_total{code="200",key="k1",model="m"} 1.0' in text

    run(scenario)


FAMILIES = ["requests_total", "prompt_tokens_total", "completion_tokens_total", "queued_requests",
            "buffered_requests", "inflight_requests", "requests_per_second", "completion_tokens_per_second",
            "ttft_seconds_bucket", "request_seconds_bucket"]  # fmt: skip


def test_metrics_has_the_families_and_health_answers() -> None:
    async def scenario() -> None:
        async with rig() as r:
            await r.post({"model": "m", "prompt": "hi", "stream": True})
            async with r.http.get(r.admin + "/metrics") as resp:
                text = await resp.text()
            for family in FAMILIES:
                assert f"hpcserve_gateway_{family}" in text, family
            async with r.http.get(r.admin + "/health") as resp:
                assert (await resp.json())["ready_replicas"] == 1
            async with r.http.get(r.url + "/health") as resp:
                assert await resp.json() == {"status": "ok"}  # the public port tells nothing more
            async with r.http.get(r.url + "/metrics") as resp:
                assert resp.status == 404

    run(scenario)


def test_memory_bounded_under_random_bad_keys_and_models() -> None:
    async def scenario() -> None:
        async with rig() as r:
            state = r.app[STATE]
            rng = random.Random(7)  # noqa: S311
            sem = asyncio.Semaphore(64)

            async def one(i: int) -> int:
                key = rng.choice([KEY, f"sk-random-{i}", None])
                model = rng.choice(["m", f"model-{i}", None])
                body = {"model": model, "prompt": "hi"} if model else {"prompt": "hi"}
                async with sem:
                    return (await r.post(body, key=key))[0]

            codes = await asyncio.gather(*(one(i) for i in range(5000)))
            assert set(codes) == {200, 400, 401, 404}
            await asyncio.sleep(0.2)
            assert (
                len(state.stats.ledgers) <= 4
                and sum(1 for e in state.stats.ledgers.values() if e.requests) == 1
            )
            assert not state.outstanding and not state.stats.inflight and not state.buffer.waiting()
            assert len(state.metrics.histograms) == 1

    run(scenario)


def test_end_to_end_against_the_engine_simulator() -> None:
    sim = pytest.importorskip("hpcserve.enginesim.server")

    async def scenario() -> None:
        config = sim.SimConfig(model="sim", decode_s_per_token=0.0005)
        async with serving(sim.make_app(config)) as up:
            routes = StaticRoutes.of(DeploymentRoute("sim", (Endpoint("sim", 0, up),)))
            rows: list[UsageRow] = []
            async with (
                serving(make_app(FAST, routes, keys=KEYS, usage_sink=rows.extend)) as gw,
                ClientSession() as http,
            ):
                headers = {"Authorization": f"Bearer {KEY}"}
                chat = {"model": "sim", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
                async with http.post(gw + "/v1/chat/completions", json=chat, headers=headers) as resp:
                    assert resp.status == 200 and (await resp.json())["usage"]["completion_tokens"] == 8
                async with http.post(
                    gw + "/v1/chat/completions", json={**chat, "stream": True}, headers=headers
                ) as resp:
                    text = await resp.text()
                assert text.endswith("data: [DONE]\n\n") and '"usage"' not in text
                await asyncio.sleep(0.3)
                assert sum(row.completion_tokens for row in rows) == 16

    run(scenario)


# -- engine keys: the gateway is the only client the engines answer ---------------------------------------
def test_each_replica_gets_its_own_engine_key_never_the_clients() -> None:
    async def scenario() -> None:
        async with rig(replicas=2) as r:
            keyed = tuple(Endpoint("m", i, r.up_urls[i], key=f"engine-{i}") for i in (0, 1))
            r.routes.set(DeploymentRoute("m", keyed))
            await asyncio.sleep(0.1)
            for stream in (False, True, False, True):
                status, _, _ = await r.post({"model": "m", "prompt": "hi", "stream": stream})
                assert status == 200
            assert [set(up.auth) for up in r.ups] == [{"Bearer engine-0"}, {"Bearer engine-1"}]
            assert not any(KEY in (a or "") for up in r.ups for a in up.auth)
            r.routes.set(DeploymentRoute("m", r.endpoints(0)))  # a routes file without keys
            await asyncio.sleep(0.1)
            assert (await r.post({"model": "m", "prompt": "hi"}))[0] == 200 and r.ups[0].auth[-1] is None
            assert "engine-0" not in repr(keyed)

    run(scenario)


def test_an_engine_that_refuses_the_replicas_key_is_skipped_and_never_401s_the_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A replica that announced another engine (bob's, with bob's key) gets its 401s: the gateway takes the
    request to a replica whose engine knows its key, or answers 502; the client never sees the 401."""
    sim = pytest.importorskip("hpcserve.enginesim.server")

    async def scenario() -> None:
        config = sim.SimConfig(model="m", decode_s_per_token=0.0005, api_key="bobs-engine-key")
        async with rig() as r, serving(sim.make_app(config)) as bobs:
            alices, squatted = r.endpoints(0)[0], Endpoint("m", 7, bobs, key="alices-engine-key")
            r.routes.set(DeploymentRoute("m", (squatted, alices)))
            await asyncio.sleep(0.1)
            assert [(await r.post({"model": "m", "prompt": "hi"}))[0] for _ in range(4)] == [200] * 4
            r.routes.set(DeploymentRoute("m", (squatted,)))
            await asyncio.sleep(0.1)
            status, _, body = await r.post({"model": "m", "prompt": "hi"})
            assert status == 502 and body["error"]["code"] == "upstream_unreachable"
            assert "refused the replica's engine key" in body["error"]["message"]
            assert "alices-engine-key" not in body["error"]["message"]
            r.routes.set(DeploymentRoute("m", (replace(squatted, key="bobs-engine-key"),)))
            await asyncio.sleep(0.1)
            assert (await r.post({"model": "m", "prompt": "hi"}))[0] == 200  # the right key: answered

    with caplog.at_level(logging.WARNING):
        run(scenario)
    assert "its engine refused the replica's engine key" in caplog.text and "engine-key" not in caplog.text


def test_a_draining_engines_503_goes_to_another_replica_and_only_then_to_the_client() -> None:
    """A replica cancelled from outside hpcserve (an admin's scancel, preemption) drains: its engine answers
    503 until its job ends and the service forgets it. The gateway takes those requests to another ready
    replica; only when every replica tried is draining does the client get a 503, with Retry-After."""
    sim = pytest.importorskip("hpcserve.enginesim.server")

    async def scenario() -> None:
        fast = sim.SimConfig(model="m", decode_s_per_token=0.0005)
        draining_app = sim.make_app(fast)
        async with serving(sim.make_app(fast)) as live_url, rig() as r, serving(draining_app) as draining_url:
            draining_app[sim.ENGINE].draining = True  # what SIGTERM does
            draining = Endpoint("m", 0, draining_url)
            r.routes.set(DeploymentRoute("m", (draining, Endpoint("m", 1, live_url))))
            await asyncio.sleep(0.1)
            answers = [await r.post({"model": "m", "prompt": "hi", "stream": i % 2 == 1}) for i in range(8)]
            assert [status for status, _, _ in answers] == [200] * 8
            r.routes.set(DeploymentRoute("m", (draining,)))
            await asyncio.sleep(0.1)
            status, headers, body = await r.post({"model": "m", "prompt": "hi"})
            assert status == 503 and body["error"]["code"] == "no_replica_ready", body
            assert "draining" in body["error"]["message"] and int(headers["Retry-After"]) > 0

    run(scenario)


@dataclass
class CountingRoutes(StaticRoutes):
    reads: int = 0

    def __call__(self) -> Any:
        self.reads += 1
        return super().__call__()


async def app_refresh_now(app: Any) -> None:
    """The gateway's periodic routes read, run now."""
    await app[GATEWAY].refresh()


def test_a_model_made_a_moment_ago_is_found_and_unknown_names_do_not_poll_the_routes() -> None:
    async def scenario() -> None:
        slow = GatewayConfig(refresh_interval_s=3600, report_interval_s=3600, usage_flush_interval_s=3600)
        ups = Upstream(name="up0")
        async with serving(upstream_app(ups)) as up_url:
            routes = CountingRoutes()
            app = make_app(slow, routes, keys=KEYS)
            async with serving(app) as url, ClientSession() as http:
                headers = {"Authorization": f"Bearer {KEY}"}
                await asyncio.sleep(0.3)  # the first read is older than MISS_REFRESH_S
                routes.set(DeploymentRoute("fresh", (Endpoint("fresh", 0, up_url),)))  # made after it
                body = {"model": "fresh", "prompt": "hi", "max_tokens": 2}
                async with http.post(url + "/v1/completions", json=body, headers=headers) as resp:
                    assert resp.status == 200, await resp.text()
                await app_refresh_now(app)  # a periodic read, just before the next deployment is made
                routes.set(DeploymentRoute("newer", (Endpoint("newer", 0, up_url),)))
                body = {"model": "newer", "prompt": "hi", "max_tokens": 2}
                async with http.post(url + "/v1/completions", json=body, headers=headers) as resp:
                    assert resp.status == 200, await resp.text()  # waited for the window, then read again
                before = routes.reads
                misses = [
                    http.post(
                        url + "/v1/completions", json={"model": f"nope-{i}", "prompt": "x"}, headers=headers
                    )
                    for i in range(50)
                ]
                answers = await asyncio.gather(*(m.__aenter__() for m in misses))
                assert {a.status for a in answers} == {404}
                for a in answers:
                    a.release()
                assert routes.reads - before <= 2  # 50 unknown names at once: one read (or two), not 50

    run(scenario)
