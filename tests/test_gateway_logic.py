"""The gateway's pure parts: routing, admission, keys and buckets, file formats, framing, counters."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner

from hpcserve.errors import ConfigError
from hpcserve.serving.gateway import (
    ApiKey,
    DeploymentRoute,
    Endpoint,
    GatewayConfig,
    hash_key,
    parse_keys,
    parse_routes,
    routes_from_file,
)
from hpcserve.serving.gateway.admission import Admitted, Rejection, admit
from hpcserve.serving.gateway.buffer import ReplicaBuffer
from hpcserve.serving.gateway.client import UpstreamPool, auth_line
from hpcserve.serving.gateway.keys import Keyring, TokenBucket
from hpcserve.serving.gateway.response import Connection, Response, UpstreamError
from hpcserve.serving.gateway.routing import pick_endpoint, prefix_digest
from hpcserve.serving.gateway.stats import Stats
from hpcserve.serving.gateway.upstream import SseRelay, read_usage

EPS = tuple(Endpoint("m", i, f"http://n{i}:8000") for i in range(3))
KEY = ApiKey("k", "alice", hash_key("sk-1"))
AT = datetime(2026, 1, 1, tzinfo=UTC)


# -- routing ---------------------------------------------------------------------------------------------
def test_least_outstanding_then_rotation_among_equals() -> None:
    load = {EPS[0].url: 2, EPS[1].url: 1, EPS[2].url: 1}
    assert [pick_endpoint(EPS, load, turn=t) for t in range(3)] == [EPS[1], EPS[2], EPS[1]]
    assert pick_endpoint(EPS, {EPS[1].url: 1, EPS[2].url: 1}) == EPS[0]
    assert pick_endpoint((), {}) is None


def test_exclude_is_hard_and_avoid_is_soft() -> None:
    assert pick_endpoint(EPS, {}, exclude=[EPS[0].url, EPS[1].url]) == EPS[2]
    assert pick_endpoint(EPS[:1], {}, exclude=[EPS[0].url]) is None
    assert pick_endpoint(EPS, {}, avoid={EPS[0].url: 1.0}) == EPS[1]
    assert pick_endpoint(EPS[:1], {}, avoid={EPS[0].url: 1.0}) == EPS[0]  # nothing else: still tried


def test_draining_replicas_are_not_ready() -> None:
    route = DeploymentRoute("m", EPS, draining=frozenset({0, 2}))
    assert route.ready() == (EPS[1],)


def test_prefix_affinity_sticks_unless_much_busier() -> None:
    digest = prefix_digest("You are a helpful assistant. " * 10, 64)
    assert digest is not None and prefix_digest("x", 0) is None and prefix_digest("", 64) is None
    preferred = pick_endpoint(EPS, {}, affinity=digest)
    assert preferred is not None
    assert all(pick_endpoint(EPS, {}, affinity=digest, turn=t) == preferred for t in range(5))
    assert pick_endpoint(EPS, {preferred.url: 4}, affinity=digest, slack=4) == preferred
    assert pick_endpoint(EPS, {preferred.url: 5}, affinity=digest, slack=4) != preferred
    # rendezvous hashing: removing another replica does not move this prefix
    others = tuple(e for e in EPS if e != preferred)
    assert pick_endpoint((preferred, others[0]), {}, affinity=digest) == preferred


# -- admission -------------------------------------------------------------------------------------------
def _admit(body: dict[str, Any], key: ApiKey = KEY, config: GatewayConfig | None = None, **route: Any) -> Any:
    routes = {"m": DeploymentRoute("m", EPS, **route)}
    return admit(msgspec.json.encode(body), routes, key, config or GatewayConfig())


def test_clamps_max_tokens_to_the_smallest_cap() -> None:
    capped = ApiKey("c", "bob", hash_key("sk-2"), max_tokens=100)
    adm = _admit({"model": "m", "prompt": "hi", "max_tokens": 500}, capped, max_tokens=200)
    assert isinstance(adm, Admitted) and adm.clamped and adm.max_tokens == 100
    assert msgspec.json.decode(adm.body)["max_tokens"] == 100
    adm = _admit(
        {"model": "m", "messages": [], "max_completion_tokens": 500}, config=GatewayConfig(max_tokens=50)
    )
    assert isinstance(adm, Admitted) and msgspec.json.decode(adm.body) == {
        "model": "m", "messages": [], "max_completion_tokens": 50,
    }  # fmt: skip
    raw = b'{"model": "m",  "prompt": "hi", "max_tokens": 10}'
    same = admit(raw, {"m": DeploymentRoute("m")}, KEY, GatewayConfig(max_tokens=50))
    assert isinstance(same, Admitted) and not same.clamped
    assert same.body == b'{"model":"m","prompt":"hi","max_tokens":10}'  # re-encoded, never the client's bytes


def test_stream_asks_the_replica_for_usage() -> None:
    adm = _admit({"model": "m", "prompt": "hi", "stream": True, "stream_options": {"x": 1}})
    assert isinstance(adm, Admitted) and not adm.client_usage
    assert msgspec.json.decode(adm.body)["stream_options"] == {"x": 1, "include_usage": True}
    adm = _admit({"model": "m", "prompt": "hi", "stream": True, "stream_options": {"include_usage": True}})
    assert isinstance(adm, Admitted) and adm.client_usage


def test_prompt_size_estimate_and_413() -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "abcd" * 10}]}]}
    adm = _admit(chat)
    assert isinstance(adm, Admitted) and adm.prompt_tokens == 10 + 4  # text / 4, plus a message's overhead
    ids = _admit({"model": "m", "prompt": [[1, 2, 3], [4, 5]], "max_tokens": 7})
    assert isinstance(ids, Admitted) and (ids.prompt_tokens, ids.cost) == (5, 12)
    big = _admit({"model": "m", "prompt": "x" * 41}, max_prompt_tokens=10)
    assert isinstance(big, Rejection) and (big.status, big.code, big.deployment) == (
        413,
        "prompt_too_long",
        "m",
    )


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [(b"", 400, "invalid_json"), (b'"x"', 400, "invalid_json"), (b'{"model": 3}', 400, "missing_model"),
     (b'{"model": "zz"}', 404, "model_not_found"),
     (b'{"model": "m", "max_tokens": 0}', 400, "invalid_type"),
     (b'{"model": "m", "max_tokens": true}', 400, "invalid_type"),
     (b'{"model": "m", "max_completion_tokens": 1.5}', 400, "invalid_type"),
     (b'{"model": "m", "stream": "true"}', 400, "invalid_type"),
     (b'{"model": "m", "stream": 1}', 400, "invalid_type")],
)  # fmt: skip
def test_bad_bodies(raw: bytes, status: int, code: str) -> None:
    answer = admit(raw, {"m": DeploymentRoute("m")}, KEY, GatewayConfig())
    assert isinstance(answer, Rejection) and (answer.status, answer.code) == (status, code)


# -- keys ------------------------------------------------------------------------------------------------
def test_token_bucket_refills_and_settles() -> None:
    bucket = TokenBucket(rate=10, burst=100, now=0)
    assert bucket.take(80, now=0) == 0 and bucket.take(30, now=0) == pytest.approx(1.0)
    assert bucket.take(30, now=1.0) == 0  # 20 + 10 refilled
    bucket.settle(charged=30, used=10, now=1.0)  # 20 given back
    assert bucket.level == pytest.approx(20)
    assert bucket.take(500, now=1.0) == pytest.approx(8.0)  # capped at burst: 100 - 20 missing at 10/s


def test_keyring_finds_bearer_keys_only() -> None:
    limited = ApiKey("l", "team", hash_key("sk-2"), rate=2.0, burst=10)
    ring = Keyring([KEY, limited], now=0)
    assert ring.find("Bearer sk-1") is KEY and ring.find("Bearer sk-1") is KEY
    assert ring.find("sk-1") is None and ring.find("Bearer nope") is None and ring.find(None) is None
    assert ring.take(KEY, 10**9, now=0) == 0
    assert ring.take(limited, 10, now=0) == 0 and ring.take(limited, 3, now=0) == 2  # ceil(3 / 2)


def test_keys_file_errors_name_the_problem() -> None:
    good = {"id": "a", "owner": "o", "sha256": "a" * 64}
    assert parse_keys({"keys": [good]})[0].id == "a"
    for doc, text in [
        ({"keys": [good, good]}, "appears more than once"),
        ({"keys": [{**good, "sha256": "abc"}]}, "64 hex digits"),
        ({"keys": [{**good, "key": "sk-plain"}]}, "unknown field"),
        ({"keys": [{"id": "a"}]}, "missing required field"),
    ]:
        with pytest.raises(ConfigError, match=text):
            parse_keys(doc, "keys.yaml")


# -- routes ----------------------------------------------------------------------------------------------
def test_routes_file_with_aliases_draining_and_reload(tmp_path: Path) -> None:
    replicas = [{"replica": 0, "url": "http://a:1/"}, {"replica": 1, "url": "http://b:1", "draining": True}]
    doc = {
        "deployments": [{"name": "llama", "aliases": ["meta/llama"], "max_tokens": 64, "replicas": replicas}]
    }
    routes = parse_routes(doc)
    assert routes["meta/llama"] is routes["llama"] and routes["llama"].max_tokens == 64
    assert routes["llama"].ready() == (Endpoint("llama", 0, "http://a:1"),)
    path = tmp_path / "routes.json"
    path.write_text(msgspec.json.encode(doc).decode())
    source = routes_from_file(path)
    assert set(source()) == {"llama", "meta/llama"}
    path.write_text('{"deployments": [{"name": "other"}]}')
    assert set(source()) == {"other"}
    path.write_text("deployments: [{nme: broken}]")
    assert set(source()) == {"other"}  # a broken file keeps the last good routes
    with pytest.raises(ConfigError, match="unknown field"):
        routes_from_file(path)


def test_routes_file_engine_keys_are_optional_bearer_tokens() -> None:
    replicas = [
        {"replica": 0, "url": "http://a:1", "engine_key": "k3y_-.~+/="},
        {"replica": 1, "url": "http://b:1"},
    ]
    (first, second) = parse_routes({"deployments": [{"name": "m", "replicas": replicas}]})["m"].endpoints
    assert (first.key, second.key) == ("k3y_-.~+/=", None) and "k3y" not in repr(first)
    assert auth_line(first.key) == b"\r\nAuthorization: Bearer k3y_-.~+/=" and auth_line(None) == b""
    for bad in ("k\r\nX-Evil: 1", "k\n", "", "a b"):
        with pytest.raises(ConfigError, match="engine_key"):
            parse_routes({"deployments": [{"name": "m", "replicas": [{**replicas[0], "engine_key": bad}]}]})
        with pytest.raises(UpstreamError, match="not a bearer token"):
            auth_line(bad)


# -- framing and relays ----------------------------------------------------------------------------------
def test_sse_relay_strips_the_usage_event_and_counts() -> None:
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
    events = [
        b'data: {"choices":[{"text":"a"}]}\n\n',
        b'data: {"choices":[{"text":"b"}]}\n\n',
        usage,
        b"data: [DONE]\n\n",
    ]
    wire = b"".join(events)
    relay = SseRelay(strip_usage=True)
    out = b"".join(relay.feed(wire[i : i + 7]) for i in range(0, len(wire), 7)) + relay.close()
    assert out == events[0] + events[1] + events[3] and relay.usage == (3, 2) and relay.done
    kept = SseRelay(strip_usage=False)
    assert kept.feed(wire) == wire
    plain = SseRelay(strip_usage=True)
    plain.feed(events[0] + events[1] + events[3])
    assert plain.usage is None and plain.completion_tokens() == 2


def test_read_usage_without_decoding() -> None:
    text = b'{"choices":[{"text":"say \\"usage\\": {\\"prompt_tokens\\": 99}"}],'
    body = text + b'"usage":{"prompt_tokens":4,"completion_tokens":6}}'
    assert read_usage(body) == (4, 6)
    assert read_usage(b'{"choices":[],"usage":null}') is None and read_usage(b"{}") is None


def _response(*pieces: bytes) -> Response:
    response = Response(UpstreamPool(4, 1.0, 1.0), Connection(), ("h", 1))
    for piece in pieces:
        response.feed(piece)
    return response


def test_upstream_response_framing() -> None:
    r = _response(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\nhe", b"llo")
    assert (r.status, r.content_type, r.complete, r.body()) == (200, "application/json", True, b"hello")
    r = _response(
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    assert (r.status, r.complete, r.body()) == (200, True, b"abc")
    r = _response(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert r.complete and r.body() == b""
    r = _response(b"HTTP/1.1 200 OK\r\n\r\npart")  # read to close
    assert not r.complete
    r.lost(None)
    assert r.complete and r.body() == b"part"


# -- counters and buffer ---------------------------------------------------------------------------------
def test_stats_rates_usage_rows_and_pruning() -> None:
    stats = Stats()
    stats.tick(0.0, AT, ["m"], lambda d: 0)
    for _ in range(4):
        stats.begin("m")
        ledger = stats.ledger("k", "alice", "m")
        ledger.count(200)
        ledger.use(10, 5)
        stats.end("m")
    stats.count("_unknown", "_none", 418)
    samples = stats.tick(2.0, AT, ["m"], lambda d: 3)
    assert samples == [samples[0]] and (samples[0].buffered, samples[0].requests_per_s) == (3, 2.0)
    assert stats.tokens_per_s["m"] == 10.0 and stats.inflight == {}
    assert stats.ledgers[("_none", "_unknown")].codes == {"4xx": 1}
    stats.prune(deployments=[], key_ids=["k"])
    assert ("k", "m") in stats.ledgers  # not flushed yet
    (row,) = stats.flush(AT)
    assert (row.key_id, row.owner, row.requests, row.prompt_tokens, row.completion_tokens) == (
        "k",
        "alice",
        4,
        40,
        20,
    )
    assert stats.flush(AT) == []
    stats.prune(deployments=[], key_ids=["k"])
    assert list(stats.ledgers) == [("_none", "_unknown")]


def test_buffer_is_fifo_bounded_and_forgets_unknown() -> None:
    import asyncio

    async def scenario() -> None:
        buffer = ReplicaBuffer(max_entries=2)
        first = asyncio.create_task(buffer.wait("m", 5))
        second = asyncio.create_task(buffer.wait("m", 5))
        await asyncio.sleep(0)
        assert buffer.depth("m") == 2
        with pytest.raises(Exception, match="m"):
            await buffer.wait("m", 5)
        assert buffer.release("m") == 2 and await first == "ready" and await second == "ready"
        gone = asyncio.create_task(buffer.wait("x", 5))
        await asyncio.sleep(0)
        buffer.forget_except(["m"])
        assert await gone == "gone" and await buffer.wait("m", 0.01) == "timeout" and buffer.waiting() == []

    asyncio.run(scenario())


def test_cli_hash_key_and_required_files() -> None:
    from hpcserve.cli.gateway_cmd import gateway

    result = CliRunner().invoke(gateway, ["--hash-key"], input="sk-1\n")
    assert result.exit_code == 0 and result.output.strip() == hash_key("sk-1")
    routes_only = CliRunner().invoke(gateway, ["--routes", "r.yaml"])
    assert routes_only.exit_code == 2 and "needs --keys" in routes_only.output
    bad_admin = CliRunner().invoke(gateway, ["--metrics-listen", "9465"])
    assert bad_admin.exit_code == 2 and "--metrics-listen" in bad_admin.output
