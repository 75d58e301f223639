"""Gateway tenancy and request normalisation, as pure functions; API keys made, listed, revoked and their
usage read through ``hpcserve.api.keys`` over a real SQLite store (no service, no Unix users needed)."""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from hpcserve.api.caller import Caller
from hpcserve.api.context import ApiContext
from hpcserve.api.keys import create_key, list_keys, parse_key_request, revoke_key, usage
from hpcserve.config import load_policy, load_site_config
from hpcserve.errors import HpcserveError, ValidationError
from hpcserve.serving.gateway import ApiKey, DeploymentRoute, GatewayConfig, hash_key
from hpcserve.serving.gateway.admission import Admitted, Rejection, admit
from hpcserve.serving.gateway.keys import Keyring, key_digest, new_secret, split_key
from hpcserve.serving.gateway.logs import OneLine, ParseErrorFilter
from hpcserve.serving.gateway.tenancy import may_reach, reachable, shared_with
from hpcserve.serving.gateway_store import gateway_key, served_routes
from hpcserve.slurm.factory import make_client
from hpcserve.store import Deployment, HistoryStore
from tests.conftest import POLICY, SITE

ALICE = ApiKey("ka", "alice", hash_key("sk-a"))
BOB = ApiKey("kb", "bob", hash_key("sk-b"))
ROUTES = {
    "a-llama": DeploymentRoute("a-llama", owner="alice"),
    "a-team": DeploymentRoute("a-team", owner="alice", shares=frozenset({"@ml"})),
    "a-bob": DeploymentRoute("a-bob", owner="alice", shares=frozenset({"bob"})),
    "c-all": DeploymentRoute("c-all", owner="carol", shares=frozenset({"all"})),
    "open": DeploymentRoute("open"),  # no owner (a routes file): every key
}


# -- tenancy ---------------------------------------------------------------------------------------------
def test_shares_name_users_groups_or_all() -> None:
    assert shared_with({"bob"}, "bob", ()) and not shared_with({"bob"}, "bobby", ())
    assert shared_with({"@ml"}, "dan", {"ml", "users"}) and not shared_with({"@ml"}, "dan", {"users"})
    assert not shared_with({"ml"}, "dan", {"ml"})  # a group must be written @group
    assert shared_with({"all"}, "anyone", ()) and not shared_with((), "alice", {"alice"})


def test_a_key_reaches_its_owners_and_what_is_shared_with_them() -> None:
    assert reachable(ALICE, ROUTES, ()) == ["a-bob", "a-llama", "a-team", "c-all", "open"]
    assert reachable(BOB, ROUTES, ()) == ["a-bob", "c-all", "open"]
    assert reachable(BOB, ROUTES, {"ml"}) == ["a-bob", "a-team", "c-all", "open"]
    assert not may_reach(BOB, "a-llama", ROUTES["a-llama"], {"ml", "alice"})


def test_a_keys_models_narrow_what_it_reaches() -> None:
    narrow = ApiKey("kn", "alice", hash_key("sk-n"), models=frozenset({"a-llama", "c-all"}))
    assert reachable(narrow, ROUTES, ()) == ["a-llama", "c-all"]
    foreign = ApiKey("kf", "bob", hash_key("sk-f"), models=frozenset({"a-llama"}))
    assert reachable(foreign, ROUTES, ()) == []  # models never widen: a-llama is not shared with bob
    by_deployment = {"served-x": DeploymentRoute("dep-x", owner="alice")}
    deployment_named = ApiKey("kd", "alice", hash_key("sk-d"), models=frozenset({"dep-x"}))
    assert reachable(deployment_named, by_deployment, ()) == ["served-x"]


def test_an_unreachable_model_is_404_exactly_as_an_unknown_one() -> None:
    raw = msgspec.json.encode({"model": "a-llama", "prompt": "hi"})
    refused, missing = (
        admit(raw, ROUTES, BOB, GatewayConfig()),
        admit(msgspec.json.encode({"model": "nope", "prompt": "hi"}), ROUTES, BOB, GatewayConfig()),
    )
    assert isinstance(refused, Rejection) and isinstance(missing, Rejection)
    assert (refused.status, refused.code, refused.type, refused.param) == (
        404, "model_not_found", "invalid_request_error", None,
    )  # fmt: skip
    assert refused.message == "The model `a-llama` does not exist or you do not have access to it."
    assert refused.deployment is None and missing.message.replace("nope", "a-llama") == refused.message
    assert isinstance(admit(raw, ROUTES, ALICE, GatewayConfig()), Admitted)


def test_served_names_index_one_deployment_each_and_never_shadow() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)

    def dep(
        name: str, owner: str, served: str | None, spec_served: str | None = None, age: int = 0
    ) -> Deployment:
        spec = {"served_model_name": spec_served} if spec_served else {}
        return Deployment(name, owner, spec, 1, 0, at.replace(day=1 + age), at, None, served, None, ["bob"])

    deps = [
        dep("a", "alice", "llama", age=1),
        dep("b", "bob", None, spec_served="llama"),  # NULL column, older: still cannot take alice's name
        dep("c", "carol", None, spec_served="qwen"),
    ]
    table = served_routes(deps, {})
    assert sorted(table) == ["qwen", "llama"][::-1] and table["llama"].name == "a"
    assert table["llama"].owner == "alice" and table["llama"].shares == frozenset({"bob"})
    assert "a" not in table and "b" not in table  # deployment names are not routes: no second namespace


# -- normalisation ---------------------------------------------------------------------------------------
def _admit(body: dict[str, Any], cap: int | None = None, key_cap: int | None = None) -> Admitted | Rejection:
    key = ApiKey("k", "alice", hash_key("sk"), max_tokens=key_cap)
    return admit(msgspec.json.encode(body), ROUTES, key, GatewayConfig(max_tokens=cap))


def test_both_token_limits_are_clamped_to_the_smallest_cap() -> None:
    adm = _admit({"model": "open", "messages": [], "max_tokens": 900, "max_completion_tokens": 700}, 500, 64)
    assert isinstance(adm, Admitted) and adm.clamped and adm.max_tokens == 64
    sent = msgspec.json.decode(adm.body)
    assert (sent["max_tokens"], sent["max_completion_tokens"]) == (64, 64)
    low = _admit({"model": "open", "prompt": "x", "max_tokens": 10, "max_completion_tokens": 900}, key_cap=64)
    assert isinstance(low, Admitted) and low.max_tokens == 64  # max_completion_tokens wins, as in vLLM
    assert msgspec.json.decode(low.body) | {} == {"model": "open", "prompt": "x", "max_tokens": 10,
                                                  "max_completion_tokens": 64}  # fmt: skip
    unset = _admit({"model": "open", "prompt": "x", "max_tokens": None}, key_cap=32)
    assert isinstance(unset, Admitted) and msgspec.json.decode(unset.body)["max_tokens"] == 32
    free = _admit({"model": "open", "prompt": "x"})
    assert isinstance(free, Admitted) and free.max_tokens is None and "max_tokens" not in free.body.decode()


@pytest.mark.parametrize(
    ("body", "param"),
    [({"stream": "true"}, "stream"), ({"stream": 1}, "stream"),
     ({"max_completion_tokens": "9"}, "max_completion_tokens"), ({"max_tokens": -1}, "max_tokens")],
)  # fmt: skip
def test_a_field_of_the_wrong_type_is_400_naming_it(body: dict[str, Any], param: str) -> None:
    answer = _admit({"model": "open", "prompt": "x", **body})
    assert isinstance(answer, Rejection) and (answer.status, answer.code, answer.param) == (
        400,
        "invalid_type",
        param,
    )
    assert param in answer.message and "\n" not in answer.message and answer.malformed


def test_the_forwarded_body_is_re_encoded_from_the_parsed_json() -> None:
    raw = b'{"model": "open", "prompt": "a", "prompt": "b", "stream": false}'  # a duplicate key: last wins
    adm = admit(raw, ROUTES, ALICE, GatewayConfig())
    assert isinstance(adm, Admitted) and adm.body == b'{"model":"open","prompt":"b","stream":false}'


# -- keys ------------------------------------------------------------------------------------------------
def test_service_keys_verify_by_hmac_and_revoked_ones_leave_the_cache() -> None:
    made = new_secret()
    parts = split_key(made.key)
    assert made.key.startswith(f"hpk_{made.key_id}_") and parts is not None and parts[0] == made.key_id
    assert made.digest == key_digest(made.salt, parts[1])
    assert made.key.split("_", 2)[2] not in made.digest and split_key("sk-other") is None
    key = ApiKey(made.key_id, "alice", salt=made.salt, digest=made.digest, rate=5.0)
    ring = Keyring([key, BOB], now=0)
    assert ring.find(f"Bearer {made.key}") is key and ring.find("Bearer sk-b") is BOB
    assert ring.find(f"Bearer hpk_{made.key_id}_wrong") is None and ring.find(f"Bearer {made.key}x") is None
    ring.take(key, 100, now=0)
    ring.update([key, BOB], {"alice": frozenset({"ml"})}, now=1)  # unchanged: still cached, same bucket
    assert ring.find(f"Bearer {made.key}") is key and ring.groups("alice") == frozenset({"ml"})
    assert ring.take(key, 300, now=1) > 0  # the bucket kept its level
    ring.update([BOB], {}, now=2)  # revoked
    assert ring.find(f"Bearer {made.key}") is None and ring.find("Bearer sk-b") is BOB


def test_gateway_keys_from_stored_rows() -> None:
    from hpcserve.store.records import ApiKeyRecord

    row = ApiKeyRecord("id1", "bob", "laptop", "s", "d", ["m1"], 5.0, None, 64, datetime.now(UTC))
    assert gateway_key(row) == ApiKey("id1", "bob", rate=5.0, max_tokens=64, models=frozenset({"m1"}),
                                      salt="s", digest="d")  # fmt: skip


@pytest.mark.parametrize(
    ("body", "text"),
    [({"rate": 0}, "rate"), ({"rate": "fast"}, "rate"), ({"burst": 5}, "needs a rate"),
     ({"max_tokens": 0}, "max_tokens"), ({"models": []}, "models"), ({"models": ["ok", ""]}, "models"),
     ({"name": "x" * 200}, "name"), ({"owner": "bob"}, "unknown")],
)  # fmt: skip
def test_key_requests_are_checked_with_the_field_named(body: dict[str, Any], text: str) -> None:
    with pytest.raises(ValidationError, match=text):
        parse_key_request(body)


@pytest.fixture
def api(tmp_path: Path) -> ApiContext:
    site = load_site_config(SITE).model_copy(update={"admins": ("@hpcadmin",)})
    store = HistoryStore(f"sqlite:///{tmp_path}/h.db")
    store.upgrade()
    return ApiContext(site, load_policy(POLICY), store, make_client(site))


def test_keys_are_stored_hashed_and_each_user_sees_only_their_own(api: ApiContext) -> None:
    alice, bob = Caller(1001, "alice", frozenset()), Caller(1002, "bob", frozenset())
    admin = Caller(1003, "carol", frozenset({"hpcadmin"}))
    record, key = create_key(api, alice, parse_key_request({"name": "nb", "models": ["m"], "max_tokens": 8}))
    assert key.startswith("hpk_") and record.digest == key_digest(record.salt, key.split("_", 2)[2])
    stored = api.store.api_key(record.id)
    assert stored is not None and key not in repr(stored) and key.split("_", 2)[2] not in repr(stored)
    create_key(api, bob, parse_key_request({}))
    assert [k.owner for k in list_keys(api, alice)] == ["alice"]
    assert sorted(k.owner for k in list_keys(api, admin, everyone=True)) == ["alice", "bob"]
    with pytest.raises(HpcserveError, match="only a site admin"):
        list_keys(api, bob, everyone=True)
    with pytest.raises(HpcserveError, match="no API key"):
        revoke_key(api, bob, record.id)  # not his: the same answer as a key that does not exist
    assert revoke_key(api, alice, record.id).revoked and api.store.api_keys(live_only=True)[0].owner == "bob"
    api.store.add_usage(record.id, "m", date.today(), 2, 10, 20)
    assert [(u.key_id, u.requests) for u in usage(api, alice, since_days=1)] == [(record.id, 2)]
    assert usage(api, bob) == [] and len(usage(api, admin, everyone=True)) == 1


def test_one_line_logs_are_throttled_and_parse_errors_lose_their_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from aiohttp.http_exceptions import BadHttpMessage

    now = [0.0]
    line = OneLine(logging.getLogger("t"), per_s=2, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        for i in range(5):
            line.warning("bad %d", i)
        now[0] = 1.5
        line.warning("bad %d", 5)
    assert [r.getMessage() for r in caplog.records] == ["bad 0", "bad 1", "bad 5 (3 similar lines dropped)"]
    try:
        raise BadHttpMessage("Invalid header value char:\n\n  b'\\x01'")
    except BadHttpMessage:
        import sys

        record = logging.LogRecord(
            "aiohttp.server", logging.ERROR, "", 0, "Error handling request", (), sys.exc_info()
        )
    assert ParseErrorFilter().filter(record) and record.exc_info is None
    assert (
        record.getMessage() == "malformed HTTP request (400): Invalid header value char:"
        and record.levelname == "WARNING"
    )


def test_rate_limits_hold_across_gateways_by_splitting(tmp_path: Path) -> None:
    from datetime import timedelta

    from hpcserve.serving.gateway.stats import GatewaySample
    from hpcserve.serving.gateway_store import keys_from_store, report_to_store
    from hpcserve.store.records import ApiKeyRecord

    with HistoryStore(f"sqlite:///{tmp_path}/h.db", admins=["root"]) as store:
        store.upgrade()
        now = datetime.now(UTC)
        store.add_api_key(ApiKeyRecord("k1", "bob", "laptop", "s", "d", None, 10.0, None, None, now))
        alone = keys_from_store(store, "login1:8000")().keys[0]
        assert (alone.rate, alone.burst) == (10.0, None)  # one gateway: the key's own limit
        for source in ("login1:8000", "login2:8000"):
            report_to_store(store, source)([GatewaySample(now, "m", 0, 0, 0.0)])
        report_to_store(store, "gone:8000")([GatewaySample(now - timedelta(minutes=5), "m", 0, 0, 0.0)])
        halves = [keys_from_store(store, s)().keys[0] for s in ("login1:8000", "login2:8000")]
        assert [(k.rate, k.burst) for k in halves] == [(5.0, 300.0)] * 2  # two live: half each, 10/s in all
