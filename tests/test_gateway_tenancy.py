"""Gateway tenancy end to end: a real ``hpcserve service`` (as root, its own 0600 database), API keys made
through it by the real Unix users alice and bob (runuser), a real ``hpcserve gateway`` process on loopback
reading keys and routes from that database, and engine simulators as the replicas (in this process, so
the test sees exactly the bodies they received).

The service's serving controller ticks once at start and then not for an hour: the test writes the
deployments and their ready replicas into the database as root (what the controller would do for
replicas it launched), and nothing reconciles them away.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiohttp import web

from hpcserve.enginesim import server as engine_sim
from hpcserve.enginesim.core import SimConfig
from hpcserve.serving.spec import DeploymentSpec
from hpcserve.store import HistoryStore
from tests.api_fixtures import ApiService, cancel_replicas, free_port, short_root  # noqa: F401 (fixtures)
from tests.conftest import wait_until
from tests.service_fixtures import terminate

pytestmark = pytest.mark.cluster
MODELS = ("alice-llm", "alice-zero", "bob-llm")  # alice-zero has no replica (scaled to zero)


@dataclass
class Sims:
    """One engine simulator per served model, on loopback, in a background event loop; every POST body
    each one received is kept in ``bodies``."""

    names: tuple[str, ...]
    urls: dict[str, str] = field(default_factory=dict)
    bodies: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _runners: list[web.AppRunner] = field(default_factory=list)

    def start(self) -> None:
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=30)

    async def _serve(self) -> None:
        for name in self.names:
            app = engine_sim.make_app(SimConfig(model=name, decode_s_per_token=0.0005))
            app.middlewares.append(self._recorder(name))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self._runners.append(runner)
            self.urls[name] = f"http://127.0.0.1:{runner.addresses[0][1]}"

    def _recorder(self, name: str) -> Any:
        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.method == "POST":
                self.bodies.append((name, json.loads(await request.read())))
            response: web.StreamResponse = await handler(request)
            return response

        return record

    def stop(self) -> None:
        async def cleanup() -> None:
            for runner in self._runners:
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)


@dataclass
class Rig:
    service: ApiService
    sims: Sims
    url: str  # the gateway's public address
    admin: str  # its /metrics address
    log: Path

    def store(self) -> HistoryStore:
        return self.service.store()

    def cli(self, user: str, *args: str) -> subprocess.CompletedProcess[str]:
        done = self.service.run_as(user, *args)
        assert done.returncode == 0, done.stderr
        return done

    def make_key(self, user: str, *args: str) -> dict[str, Any]:
        return dict(json.loads(self.cli(user, "keys", "create", "--json", *args).stdout))

    def post(
        self, key: str, body: dict[str, Any] | bytes, path: str = "/v1/chat/completions"
    ) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        return httpx.post(self.url + path, content=content, headers=headers, timeout=30)

    def await_answer(self, key: str, body: dict[str, Any], status: int) -> None:
        """Until ``body`` gets ``status`` (the gateway re-reads keys and routes every few seconds); on
        timeout, the last answer and the gateway's log say why."""
        last: list[httpx.Response] = []

        def answered() -> bool:
            last[:] = [self.post(key, body)]
            return last[0].status_code == status

        try:
            wait_until(answered, timeout=30)
        except AssertionError:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise AssertionError(
                f"last answer {last[0].status_code} {last[0].text[:300]}; log:\n{tail}"
            ) from None

    def models(self, key: str) -> list[str]:
        answer = httpx.get(self.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert answer.status_code == 200, answer.text
        return [m["id"] for m in answer.json()["data"]]


def _quiet_controller(service: ApiService) -> None:
    """The service's serving controller ticks at start, then not for an hour (see the module docstring)."""
    data = yaml.safe_load(service.site.read_text())
    data["serving"] = {**(data.get("serving") or {}), "controller_interval_s": 3600}
    service.site.write_text(yaml.safe_dump(data))


def _deploy(store: HistoryStore, sims: Sims) -> None:
    for name, owner in zip(MODELS, ("alice", "alice", "bob"), strict=True):
        spec = DeploymentSpec.model_validate({"name": name, "model": name, "engine": "simulator"}).model_dump(
            mode="json"
        )
        store.create_deployment(name, owner, spec, 1 if name in sims.urls else 0, served_model_name=name)
        if name in sims.urls:
            store.upsert_replica(name, 0, state="ready", url=sims.urls[name], job_id="1")


@pytest.fixture
def rig(short_root: Path, slurm_env: dict[str, str]) -> Iterator[Rig]:  # noqa: F811
    service = ApiService(short_root, slurm_env, f"sqlite:///{short_root}/state/hpcserve.db")
    _quiet_controller(service)
    service.start("--sample-interval", "0", "--rebalance-interval", "0")
    sims = Sims(("alice-llm", "bob-llm"))
    gateway: subprocess.Popen[bytes] | None = None
    try:
        service.wait_ready()
        sims.start()
        with service.store() as store:
            # the controller's one tick at start comes first: after it, nothing reconciles the rows below
            wait_until(lambda: store.lock_holder("serving-controller") is not None, timeout=60)
            time.sleep(5.0)  # the tick that took the lease finishes (it finds no deployment): squeue + a read
            _deploy(store, sims)
        port, admin = free_port(), free_port()
        log = short_root / "gateway.log"
        argv = [sys.executable, "-m", "hpcserve", "gateway", "--host", "127.0.0.1", "--port", str(port),
                "--metrics-listen", f"127.0.0.1:{admin}", "--buffer-timeout", "1"]  # fmt: skip
        with log.open("wb") as out:
            gateway = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=service.env)
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}/health"), timeout=30)
        yield Rig(service, sims, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", log)
    finally:
        if gateway is not None:
            terminate([gateway])
        sims.stop()
        service.stop()
        cancel_replicas(service)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _raw(url: str, request: bytes) -> bytes:
    """What the server answers to ``request``, sent as raw bytes (httpx will not send malformed HTTP)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        return sock.recv(4096)


def _chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], **extra}


def test_keys_reach_only_their_owners_models_until_shared(rig: Rig) -> None:
    alice = rig.make_key("alice", "--name", "notebook", "--max-tokens", "7")
    shown = rig.cli("bob", "keys", "create", "--name", "laptop")  # plain output: the key, once
    bob_key = shown.stdout.strip()
    assert bob_key.startswith("hpk_") and "shown only now" in shown.stderr
    listed = json.loads(rig.cli("alice", "keys", "list", "--json").stdout)
    assert [k["id"] for k in listed] == [alice["id"]] and "key" not in listed[0]
    with rig.store() as store:
        rows = store.api_keys()
    assert sorted(r.owner for r in rows) == ["alice", "bob"]
    for key in (alice["key"], bob_key):  # the database holds neither a key nor its secret
        assert not any(key.split("_", 2)[2] in repr(r) for r in rows)

    # new keys work within seconds; bob reaches his own model, not alice's unshared one (404 as OpenAI
    # answers it), and it is not listed for him
    rig.await_answer(bob_key, _chat("bob-llm", max_tokens=3), 200)
    refused = rig.post(bob_key, _chat("alice-llm"))
    assert refused.status_code == 404 and refused.json() == {"error": {
        "message": "The model `alice-llm` does not exist or you do not have access to it.",
        "type": "invalid_request_error", "param": None, "code": "model_not_found"}}  # fmt: skip
    assert rig.models(bob_key) == ["bob-llm"]
    assert rig.models(alice["key"]) == ["alice-llm", "alice-zero"]
    assert not any(name == "alice-llm" for name, _ in rig.sims.bodies)

    # alice shares with bob (through the service, as herself): within seconds his key reaches her model
    rig.cli("alice", "share", "alice-llm", "bob")
    rig.await_answer(bob_key, _chat("alice-llm", max_tokens=2), 200)
    assert rig.models(bob_key) == ["alice-llm", "bob-llm"]
    assert rig.post(bob_key, _chat("alice-zero")).status_code == 404  # only what she shared

    # alice's key caps both token limits at 7: what the simulator received, and what it generated
    del rig.sims.bodies[:]
    both = rig.post(alice["key"], _chat("alice-llm", max_tokens=900, max_completion_tokens=800))
    assert both.status_code == 200 and both.json()["usage"]["completion_tokens"] == 7
    assert both.headers["X-Hpcserve-Max-Tokens"] == "7; clamped"
    legacy = rig.post(
        alice["key"], {"model": "alice-llm", "prompt": "hi", "max_tokens": 50}, "/v1/completions"
    )
    assert legacy.status_code == 200 and legacy.json()["usage"]["completion_tokens"] == 7
    received = [body for _, body in rig.sims.bodies]
    assert (received[0]["max_tokens"], received[0]["max_completion_tokens"]) == (7, 7)
    assert received[1]["max_tokens"] == 7

    # "stream": "true" is not a boolean: 400 naming the field, before any replica sees it
    bad = rig.post(alice["key"], _chat("alice-llm", stream="true"))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "stream"
    assert "'stream' must be a JSON boolean" in bad.json()["error"]["message"] and len(rig.sims.bodies) == 2

    # revoked: refused within seconds
    rig.cli("alice", "keys", "revoke", alice["id"])
    rig.await_answer(alice["key"], _chat("alice-llm"), 401)
    assert rig.post(bob_key, _chat("alice-llm", max_tokens=1)).status_code == 200  # other keys still work


def test_an_unreachable_model_at_zero_is_not_woken_and_metrics_stay_off_the_public_port(rig: Rig) -> None:
    bob = rig.make_key("bob")
    alice = rig.make_key("alice")
    rig.await_answer(bob["key"], _chat("bob-llm", max_tokens=1), 200)
    for _ in range(3):
        assert rig.post(bob["key"], _chat("alice-zero")).status_code == 404
    assert rig.post(alice["key"], _chat("alice-zero")).status_code == 503  # hers: buffered, then 503

    def waiting() -> list[int]:
        with rig.store() as store:
            return [s.gateway_waiting or 0 for s in store.engine_samples("alice-zero")]

    wait_until(lambda: max(waiting(), default=0) >= 1, timeout=10)  # alice's own request woke it
    assert max(waiting()) == 1  # bob's three never did

    assert httpx.get(rig.url + "/metrics", timeout=5).status_code == 404
    metrics = httpx.get(rig.admin + "/metrics", timeout=5)
    assert metrics.status_code == 200 and "hpcserve_gateway_requests_total" in metrics.text
    assert httpx.get(rig.url + "/health", timeout=5).json() == {"status": "ok"}

    # a malformed request: 400, and one line in the gateway's log, no traceback
    assert rig.post(bob["key"], b'{"model": "bob-llm", "messages": [}').status_code == 400
    answer = _raw(rig.url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n")
    assert answer.split(b"\r\n")[0].endswith(b" 400 Bad Request")
    wait_until(lambda: "malformed HTTP request" in rig.log.read_text(), timeout=5)
    text = rig.log.read_text()
    assert "malformed request from" in text and "Traceback" not in text

    usage = json.loads(rig.cli("alice", "keys", "usage", "--json").stdout)
    assert usage == [] or all(row["key_id"] == alice["id"] for row in usage)
