"""hpcserve usage's API layer on a real store (SQLite), with a recorded sacct text behind a stand-in reader:
who is asked for (the caller, never a name from the query), what each caller sees, and bad queries."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import click
import pytest

from hpcserve.api.caller import Caller
from hpcserve.api.context import ApiContext
from hpcserve.api.usage import UsageQuery, parse_usage_query, usage
from hpcserve.cli.usage_cmd import parse_since
from hpcserve.config import load_policy, load_site_config
from hpcserve.config.sections import CostSettings
from hpcserve.errors import ValidationError
from hpcserve.model.usage import GpuAllocation
from hpcserve.slurm.parsers import parse_sacct_usage
from hpcserve.store import HistoryStore
from hpcserve.store.records import ApiKeyRecord
from tests.conftest import POLICY, SITE
from tests.test_usage_compute import NONCE, SACCT

NOW = datetime(2026, 12, 7, 18, 5, tzinfo=UTC)
ALICE, BOB = Caller(1001, "alice", frozenset()), Caller(1002, "bob", frozenset())
CAROL = Caller(1003, "carol", frozenset({"hpcadmin"}))


class RecordedSacct:
    """What sacct would answer: the recorded runs, narrowed to ``user`` as ``--user`` does."""

    def __init__(self) -> None:
        self.asked: list[str | None] = []

    def gpu_allocations(self, since: datetime, until: datetime, user: str | None) -> list[GpuAllocation]:
        self.asked.append(user)
        return [run for run in parse_sacct_usage(SACCT, NONCE) if user is None or run.user == user]


@pytest.fixture
def api(tmp_path: Path) -> ApiContext:
    cost = CostSettings(gpu_hour_price={"default": 2.0, "h100": 3.6, "l40s": 1.2})
    site = load_site_config(SITE).model_copy(update={"admins": ("@hpcadmin",), "cost": cost})
    store = HistoryStore(f"sqlite:///{tmp_path}/h.db")
    store.upgrade()
    store.create_deployment("m", "bob", {"name": "m"}, 1, served_model_name="m")
    for key_id, owner in (("ka", "alice"), ("kb", "bob")):
        store.add_api_key(ApiKeyRecord(id=key_id, owner=owner, label="", salt="s", digest="d", models=None,
                                       rate=None, burst=None, max_tokens=None, created_at=NOW))  # fmt: skip
    store.add_usage("ka", "m", date(2026, 12, 7), 2, 300, 700)
    store.add_usage("kb", "m", date(2026, 12, 7), 1, 100, 100)
    store.add_usage("kb", "m", date(2026, 10, 1), 9, 9, 9)  # before the window
    return ApiContext(site, load_policy(POLICY), store, RecordedSacct(), clock=lambda: NOW)  # type: ignore[arg-type]


def test_a_user_is_read_as_themselves_and_sees_only_their_own(api: ApiContext) -> None:
    report = usage(api, BOB, UsageQuery(since_s=3600, by="user", jobs=True))
    assert api.slurm.asked == ["bob"]  # type: ignore[attr-defined]
    assert report["scope"] == "bob" and [g["group"] for g in report["groups"]] == ["bob"]
    assert {j["user"] for j in report["jobs"]} == {"bob"}
    bob = report["groups"][0]
    # 102: 4 l40s x 120 s, a replica of bob's m; 104: two runs of 1 GPU, 10 s + 20 s; 105: 1 GPU x 1 s
    assert bob["gpu_seconds"] == 4 * 120 + 10 + 20 + 1 and bob["inference_gpu_hours"] == round(480 / 3600, 6)
    assert bob["tokens"] == 200  # his key only, today only: alice's 1000 tokens on his deployment are hers
    assert bob["cost"] == pytest.approx(511 / 3600 * 1.2, abs=1e-6)  # node[5-8] are l40s in the site config
    by_deployment = usage(api, BOB, UsageQuery(since_s=3600, by="deployment"))
    m = next(g for g in by_deployment["groups"] if g["group"] == "m")
    assert m["tokens"] == 1200 and m["cost_per_million_tokens"] == pytest.approx(
        4 * 120 / 3600 * 1.2 / 1200 * 1e6, rel=1e-5
    )  # his deployment: every key's traffic, summed
    assert "jobs" not in by_deployment
    keys = usage(api, BOB, UsageQuery(since_s=3600, by="key"))
    assert [g["group"] for g in keys["groups"]] == ["kb"]  # never alice's key


def test_an_admin_reads_everyone(api: ApiContext) -> None:
    report = usage(api, CAROL, UsageQuery(since_s=3600, by="account"))
    assert api.slurm.asked == [None] and report["scope"] == "everyone"  # type: ignore[attr-defined]
    accounts = {g["group"]: g for g in report["groups"]}
    assert accounts["acct-alice"]["gpu_seconds"] == 60 and accounts["acct-bob"]["gpu_seconds"] == 511
    assert report["total"]["tokens"] == 1200 and report["total"]["jobs"] == 5
    alice = usage(api, ALICE, UsageQuery(since_s=3600))["total"]
    assert alice["gpu_seconds"] == 60 and alice["cost"] == pytest.approx(60 / 3600 * 3.6, abs=1e-6)  # h100


def test_hpcserve_only_keeps_replicas(api: ApiContext) -> None:
    report = usage(api, CAROL, UsageQuery(since_s=3600, by="partition", hpcserve_only=True, jobs=True))
    assert [j["job_id"] for j in report["jobs"]] == ["102"] and report["groups"][0]["group"] == "infer"


@pytest.mark.parametrize(
    ("query", "text"),
    [({"since_s": "-5"}, "since_s"), ({"since_s": "soon"}, "since_s"), ({"by": "team"}, "by: 'team'"),
     ({"user": "alice"}, "unknown usage parameters"), ({"jobs": "maybe"}, "jobs")],
)  # fmt: skip
def test_bad_queries_name_the_field(query: dict[str, str], text: str) -> None:
    with pytest.raises(ValidationError, match=text):
        parse_usage_query(query)


def test_query_defaults_and_since() -> None:
    assert parse_usage_query({}) == UsageQuery()
    assert parse_usage_query({"since_s": "60", "by": "key", "hpcserve_only": "1"}) == UsageQuery(
        60, "key", True
    )
    assert [parse_since(t) for t in ("30d", "12h", "90m", "3600s", "2w", "7")] == [
        30 * 86400, 12 * 3600, 5400, 3600, 14 * 86400, 7 * 86400
    ]  # fmt: skip
    for bad in ("", "d", "-3d", "3x", "infd"):
        with pytest.raises(click.BadParameter, match="not a duration"):
            parse_since(bad)
    assert timedelta(seconds=UsageQuery().since_s) == timedelta(days=30)
