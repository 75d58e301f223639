"""Overload decisions, purely (overload.py), and the gate that acts on them (queue.py) with a fake clock:
the queue's order, the drain rate, who is shed, Retry-After, fallback, the max_tokens cap, and where the
settings come from (deployment spec, routes file, keys)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from hpcserve.api.caller import Caller
from hpcserve.api.context import ApiContext
from hpcserve.api.keys import create_key, key_view, parse_key_request
from hpcserve.config import load_policy, load_site_config
from hpcserve.errors import ConfigError, ValidationError
from hpcserve.model.gateway import ApiKey, DeploymentRoute, Endpoint, Overload, Priority
from hpcserve.serving.gateway.admission import Admitted, admit, retarget
from hpcserve.serving.gateway.config import GatewayConfig
from hpcserve.serving.gateway.keys import parse_keys
from hpcserve.serving.gateway.overload import (
    RETRY_AFTER_MAX_S,
    FallBack,
    Go,
    Load,
    PriorityQueue,
    ServiceTime,
    Shed,
    Wait,
    decide,
    drain_rate,
    fallback_route,
    retry_after,
    slots,
)
from hpcserve.serving.gateway.queue import Gate, Slot
from hpcserve.serving.gateway.routes import index_routes, parse_routes
from hpcserve.serving.gateway.stats import GatewaySample
from hpcserve.serving.gateway_store import keys_from_store, report_to_store, spec_overload
from hpcserve.serving.spec import DeploymentSpec, load_deployment
from hpcserve.slurm.factory import make_client
from hpcserve.store import HistoryStore
from tests.conftest import POLICY, SITE

BOUNDED = Overload(max_concurrency=4, interactive_reserve=1, shed_wait_s=10.0, max_replicas=1)


def load(interactive: int = 0, batch: int = 0, free: bool = False, rate: float | None = 2.0,
         ready: int = 1, queue_max: int = 100) -> Load:  # fmt: skip
    return Load(interactive, batch, free, rate, ready, queue_max)


# -- the queue's order ------------------------------------------------------------------------------------
def test_priority_queue_serves_interactive_fifo_then_batch_fifo() -> None:
    queue: PriorityQueue[str] = PriorityQueue()
    arrivals: list[tuple[str, Priority]] = [("b1", "batch"), ("i1", "interactive"), ("b2", "batch"),
                                            ("i2", "interactive")]  # fmt: skip
    positions = [queue.push(item, p) for item, p in arrivals]
    assert positions == [1, 1, 3, 2]  # an interactive arrival goes ahead of every batch one
    assert list(queue) == ["i1", "i2", "b1", "b2"]
    assert queue.pop(["batch"]) == "b1" and queue.pop_newest("batch") == "b2"
    assert [queue.pop(), queue.pop(), queue.pop()] == ["i1", "i2", None]


# -- drain rate and Retry-After ---------------------------------------------------------------------------
def test_drain_rate_is_slots_over_the_mean_service_time() -> None:
    service = ServiceTime()
    assert drain_rate(8, service.mean) is None  # nothing finished yet: unknown, nothing is shed blind
    for seconds in (2.0, 2.0, 2.0):
        service.observe(seconds)
    assert drain_rate(8, service.mean) == pytest.approx(4.0)
    service.observe(12.0)  # one slow request moves the EWMA by a tenth of the difference
    assert service.mean == pytest.approx(3.0) and drain_rate(8, service.mean) == pytest.approx(8 / 3)


@pytest.mark.parametrize(("rate", "position", "expected"), [(4.0, 80, 20), (0.5, 12, 24), (3.0, 70, 24)])
def test_retry_after_follows_the_drain_rate(rate: float, position: int, expected: int) -> None:
    """A batch request at ``position`` behind a queue draining at ``rate``/s, bound 10 s: shed, told to
    come back in ceil(position / rate) seconds."""
    waiting = position - 1
    shed = decide("batch", load(batch=waiting, rate=rate), BOUNDED, may_fall_back=False)
    assert isinstance(shed, Shed) and shed.reason == "overload"
    assert shed.retry_after == expected == math.ceil(position / rate)


def test_retry_after_is_clamped() -> None:
    assert retry_after(0.01) == 1 and retry_after(1e6) == RETRY_AFTER_MAX_S and retry_after(None) == 300


# -- who is shed ------------------------------------------------------------------------------------------
def test_a_free_slot_and_nobody_ahead_goes_at_once() -> None:
    assert decide("batch", load(free=True), BOUNDED, False) == Go()
    assert decide("interactive", load(batch=5, free=True), BOUNDED, False) == Go()  # batch is behind it
    assert isinstance(decide("batch", load(batch=1, free=True), BOUNDED, False), Wait)  # FIFO within batch


def test_batch_is_shed_before_any_interactive_request() -> None:
    """Rate 2/s, bound 10 s: 20 positions drain in time. Batch past 20 is shed; interactive requests queue
    ahead of batch, and each one pushes the newest queued batch request out instead of being refused."""
    assert decide("batch", load(batch=19), BOUNDED, False) == Wait(20, 10.0)
    shed = decide("batch", load(batch=20), BOUNDED, False)
    assert isinstance(shed, Shed) and shed.retry_after == 11
    interactive = decide("interactive", load(interactive=3, batch=17), BOUNDED, False)
    assert interactive == Wait(4, 2.0, evict=1)  # 21 would wait: the newest batch request goes
    refused = decide("interactive", load(interactive=20, batch=4), BOUNDED, False)
    assert isinstance(refused, Shed) and refused.evict == 4  # every batch request is shed with it


def test_below_max_replicas_nothing_is_shed_the_queue_grows_for_the_autoscaler() -> None:
    growing = Overload(max_concurrency=4, shed_wait_s=10.0, max_replicas=3)
    assert decide("batch", load(batch=500, ready=2, queue_max=1000), growing, False) == Wait(501, 250.5)
    assert isinstance(decide("batch", load(batch=500, ready=3, queue_max=1000), growing, False), Shed)


def test_no_shed_bound_or_unknown_rate_waits_and_a_full_queue_sheds_batch_first() -> None:
    assert isinstance(decide("batch", load(batch=99, rate=None), BOUNDED, False), Wait)
    unbounded = Overload(max_concurrency=4)
    assert isinstance(decide("batch", load(batch=99), unbounded, False), Wait)
    full = decide("batch", load(batch=100), unbounded, False)
    assert isinstance(full, Shed) and full.reason == "queue_full"
    assert decide("interactive", load(batch=100), unbounded, False) == Wait(1, 0.5, evict=1)


def test_interactive_slots_are_reserved_from_batch() -> None:
    assert slots(BOUNDED, 3) == (12, 9)
    assert slots(Overload(max_concurrency=1, interactive_reserve=5), 2) == (2, 2)  # never all of them
    assert slots(Overload(), 3) is None


# -- fallback ---------------------------------------------------------------------------------------------
BIG = DeploymentRoute("big", (Endpoint("big", 0, "http://a"),), owner="alice",
                      overload=Overload(4, 1, 30.0, 1, fallback="small", fallback_wait_s=5.0))  # fmt: skip
SMALL = DeploymentRoute("small", (Endpoint("small", 0, "http://b"),), owner="alice")
ROUTES = index_routes([BIG, SMALL], {"small": ["org/small"]})
ALLOWED = ApiKey("a", "alice", allow_fallback=True)


def test_fallback_only_for_a_key_that_allows_it_and_reaches_the_fallback() -> None:
    assert fallback_route(ALLOWED, BIG, ROUTES, ()) == ("small", SMALL)
    assert fallback_route(ApiKey("n", "alice"), BIG, ROUTES, ()) is None  # allow_fallback defaults false
    assert fallback_route(ApiKey("m", "alice", models=frozenset({"big"}), allow_fallback=True),
                          BIG, ROUTES, ()) is None  # the key does not reach "small"  # fmt: skip
    assert fallback_route(ApiKey("b", "bob", allow_fallback=True), BIG, ROUTES, ()) is None  # alice's
    cold = index_routes([BIG, DeploymentRoute("small", owner="alice")])
    assert fallback_route(ALLOWED, BIG, cold, ()) is None  # no ready replica: no fallback


def test_fallback_past_its_own_bound_and_before_shedding() -> None:
    assert decide("batch", load(batch=9), BIG.overload, True) == Wait(10, 5.0)  # 5 s: not past it
    assert decide("batch", load(batch=10), BIG.overload, True) == FallBack("small", 5.5)
    assert decide("batch", load(batch=10), BIG.overload, False) == Wait(11, 5.5)  # not allowed: waits
    assert isinstance(decide("batch", load(batch=80), BIG.overload, False), Shed)
    assert isinstance(decide("batch", load(batch=80), BIG.overload, True), FallBack)


def test_retarget_asks_for_the_fallback_model() -> None:
    raw = msgspec.json.encode({"model": "big", "prompt": "hi", "max_tokens": 4})
    again = admit(retarget(raw, "small"), ROUTES, ALLOWED, GatewayConfig())
    assert isinstance(again, Admitted) and again.route is SMALL
    assert msgspec.json.decode(again.body)["model"] == "small"


# -- the max_tokens cap under overload --------------------------------------------------------------------
def test_max_tokens_is_capped_under_overload_only() -> None:
    route = DeploymentRoute("m", overload=Overload(max_tokens=32))
    routes, key, config = {"m": route}, ApiKey("k", "u"), GatewayConfig()

    def ask(max_tokens: int | None, overloaded: bool, key: ApiKey = key) -> Admitted:
        raw = msgspec.json.encode({"model": "m", "prompt": "x", "max_tokens": max_tokens})
        got = admit(raw, routes, key, config, (), lambda r: r.overload.max_tokens if overloaded else None)
        assert isinstance(got, Admitted)
        return got

    calm, busy = ask(100, False), ask(100, True)
    assert (calm.max_tokens, calm.clamped, calm.overload_capped) == (100, False, False)
    assert (busy.max_tokens, busy.clamped, busy.overload_capped) == (32, True, True)
    assert msgspec.json.decode(busy.body)["max_tokens"] == 32
    small = ask(8, True)
    assert (small.max_tokens, small.overload_capped) == (8, False)  # under the cap: untouched
    tighter = ask(100, True, ApiKey("k2", "u", max_tokens=16))
    assert (tighter.max_tokens, tighter.overload_capped) == (16, False)  # the key's own cap binds


# -- the gate: slots, hand-off in priority order, evictions ----------------------------------------------
async def settle() -> None:
    """Let woken tasks run (a shielded future takes a few loop turns to reach its waiter)."""
    for _ in range(5):
        await asyncio.sleep(0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_gate_hands_freed_slots_to_interactive_first_and_evicts_batch() -> None:
    route = DeploymentRoute("m", (Endpoint("m", 0, "http://a"),),
                            overload=Overload(max_concurrency=2, shed_wait_s=2.0))  # fmt: skip

    async def scenario() -> None:
        clock = Clock()
        gate = Gate(lambda: {"m": route}, clock, queue_max=100, queue_timeout_s=60)
        first = await gate.acquire(route, "batch", False)
        second = await gate.acquire(route, "batch", False)
        assert isinstance(first, Slot) and isinstance(second, Slot)
        # nothing finished yet: the rate is unknown, so later arrivals wait instead of being shed
        waiters = [asyncio.create_task(gate.acquire(route, p, False))
                   for p in ("batch", "batch", "interactive", "batch")]  # fmt: skip
        await settle()
        assert (gate.waiting("m", "interactive"), gate.waiting("m", "batch")) == (1, 3)
        clock.now = 1.0
        gate.release(first)  # one request took 1 s: 2 slots / 1 s = 2 requests/s
        assert gate.rate("m") == pytest.approx(2.0)
        await settle()
        assert isinstance(waiters[2].result(), Slot)  # the interactive one, though it came third
        # rate 2/s, bound 2 s: 4 positions. 3 batch wait; two interactive arrivals push the newest out
        more = [asyncio.create_task(gate.acquire(route, "interactive", False)) for _ in range(2)]
        await settle()
        evicted = waiters[3].result()
        assert isinstance(evicted, Shed) and evicted.reason == "evicted" and evicted.retry_after == 3
        assert gate.lanes["m"].shed == {("batch", "evicted"): 1}
        for task in [*waiters[:2], *more]:
            task.cancel()
        await asyncio.gather(*waiters[:2], *more, return_exceptions=True)
        assert not gate.lanes["m"].queue

    asyncio.run(scenario())


def test_a_waiter_that_gives_up_after_its_slot_was_granted_gives_it_back() -> None:
    route = DeploymentRoute("m", (Endpoint("m", 0, "http://a"),), overload=Overload(max_concurrency=1))

    async def scenario() -> None:
        gate = Gate(lambda: {"m": route}, Clock(), queue_max=10, queue_timeout_s=60)
        held = await gate.acquire(route, "interactive", False)
        assert isinstance(held, Slot)
        waiter = asyncio.create_task(gate.acquire(route, "interactive", False))
        await settle()
        gate.release(held)  # granted to the waiter ...
        waiter.cancel()  # ... which is cancelled before it runs again
        await asyncio.gather(waiter, return_exceptions=True)
        assert gate.lanes["m"].held == {"interactive": 0, "batch": 0}

    asyncio.run(scenario())


# -- where the settings come from -------------------------------------------------------------------------
def spec(**extra: Any) -> DeploymentSpec:
    return DeploymentSpec.model_validate({"name": "m", "model": "org/m", "engine": "simulator", **extra})


def test_spec_overload_defaults_to_the_engines_max_num_seqs() -> None:
    assert spec().overload == Overload(32, 4, 30.0, 1)
    assert spec(max_concurrency=0).overload.max_concurrency is None  # 0: no bound
    assert spec(engine="vllm", gpus_per_replica=1).overload.max_concurrency == 256
    given = spec(max_concurrency=8, interactive_reserve=2, shed_wait_s=None, max_replicas=3,
                 fallback="small", fallback_wait_s=4, overload_max_tokens=64).overload  # fmt: skip
    assert given == Overload(8, 2, None, 3, "small", 4.0, 64)
    assert spec_overload(spec(max_concurrency=8).model_dump(mode="json")).max_concurrency == 8
    assert spec_overload({"name": "old", "model": "x", "no_such_field": 1}) == Overload()


@pytest.mark.parametrize(
    ("extra", "field"),
    [({"fallback": "m"}, "fallback"), ({"fallback": "Not DNS"}, "fallback"),
     ({"fallback": "x", "shed_wait_s": None}, "fallback_wait_s"), ({"shed_wait_s": -1}, "shed_wait_s"),
     ({"overload_max_tokens": 0}, "overload_max_tokens"), ({"max_concurrency": -2}, "max_concurrency")],
)  # fmt: skip
def test_bad_overload_settings_name_the_field(extra: dict[str, Any], field: str, tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(json.dumps({"name": "m", "model": "org/m", "engine": "simulator", **extra}))
    with pytest.raises(ConfigError) as err:
        load_deployment(path)
    assert err.value.field == field and "\n" not in str(err.value)


def test_routes_file_and_keys_file_carry_the_settings() -> None:
    routes = parse_routes({"deployments": [{"name": "m", "max_concurrency": 8, "shed_wait_s": 5,
                                             "fallback": "s", "overload_max_tokens": 16}]})  # fmt: skip
    assert routes["m"].overload == Overload(8, 0, 5.0, None, "s", None, 16)
    with pytest.raises(Exception, match="max_concurrency"):
        parse_routes({"deployments": [{"name": "m", "max_concurrency": 0}]})
    key = parse_keys({"keys": [{"id": "b", "owner": "u", "sha256": "a" * 64, "priority": "batch",
                                "allow_fallback": True}]})[0]  # fmt: skip
    assert (key.priority, key.allow_fallback) == ("batch", True)
    with pytest.raises(Exception, match="priority"):
        parse_keys({"keys": [{"id": "b", "owner": "u", "sha256": "a" * 64, "priority": "urgent"}]})


def test_key_requests_take_priority_and_allow_fallback_and_name_bad_fields() -> None:
    made = parse_key_request({"priority": "batch", "allow_fallback": True})
    assert (made.priority, made.allow_fallback) == ("batch", True)
    assert parse_key_request({}).priority == "interactive" and not parse_key_request({}).allow_fallback
    for body, field in (({"priority": "urgent"}, "priority"), ({"allow_fallback": "yes"}, "allow_fallback")):
        with pytest.raises(ValidationError, match=f"^{field}:"):
            parse_key_request(body)


def test_key_priority_and_fallback_are_stored_and_reach_the_gateway(tmp_path: Path) -> None:
    """Through the API and the database (migrations at head), as ``hpcserve keys create`` stores them;
    a gateway's queued requests reach the autoscaler's samples with the buffered ones."""
    with HistoryStore(f"sqlite:///{tmp_path}/h.db", admins=["root"]) as store:
        store.upgrade()
        site = load_site_config(SITE)
        api = ApiContext(site, load_policy(POLICY), store, make_client(site))
        bob = Caller(1002, "bob", frozenset())
        made, _ = create_key(api, bob, parse_key_request({"priority": "batch", "allow_fallback": True}))
        plain, _ = create_key(api, bob, parse_key_request({}))
        assert key_view(made)["priority"] == "batch" and key_view(made)["allow_fallback"] is True
        keys = {k.id: k for k in keys_from_store(store)().keys}
        assert (keys[made.id].priority, keys[made.id].allow_fallback) == ("batch", True)
        assert (keys[plain.id].priority, keys[plain.id].allow_fallback) == ("interactive", False)
        now = datetime.now(UTC)
        report_to_store(store, "gw:8000")([GatewaySample(now, "m", 2, 8, 1.0, queued=30)])
        gateway = [
            e for e in store.engine_samples("m", since=now - timedelta(seconds=10)) if e.replica is None
        ]
        assert [e.gateway_waiting for e in gateway] == [32]  # what the controller sums per live gateway


def test_shedding_is_logged_once_per_burst(caplog: pytest.LogCaptureFixture) -> None:
    route = DeploymentRoute("m", (Endpoint("m", 0, "http://a"),),
                            overload=Overload(max_concurrency=1, shed_wait_s=0.0))  # fmt: skip

    async def scenario() -> None:
        clock = Clock()
        gate = Gate(lambda: {"m": route}, clock, queue_max=100, queue_timeout_s=60)
        held = await gate.acquire(route, "batch", False)
        assert isinstance(held, Slot)
        clock.now = 1.0
        gate.release(held)  # 1 s a request: 1 request/s
        held = await gate.acquire(route, "batch", False)
        for _ in range(50):  # bound 0 s: every waiter is shed
            assert isinstance(await gate.acquire(route, "batch", False), Shed)
        gate.tick()
        clock.now = 10.0
        gate.tick()

    with caplog.at_level(logging.WARNING, "hpcserve.serving.gateway.queue"):
        asyncio.run(scenario())
    assert [r.getMessage() for r in caplog.records] == [
        "deployment m is overloaded: shedding (overload, expected wait 1.0 s, 0 waiting)",
        "deployment m stopped shedding after 0.0 s; shed batch 50",
    ]
