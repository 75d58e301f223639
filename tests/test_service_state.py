"""The service's named decision state (table service_state) on SQLite and PostgreSQL: stored and replaced
whole, listed by prefix in one query, forgotten; a name too long or a value that is not an object is refused
before anything is written."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from hpcserve.store import HistoryStore, StoreError
from hpcserve.store.schema import ServiceStateRow
from tests.store_helpers import BACKENDS, empty_database

T0 = datetime(2025, 3, 3, 12, 0, tzinfo=UTC)


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HistoryStore]:
    with empty_database(request.param, tmp_path) as url, HistoryStore(url, clock=lambda: T0) as s:
        s.upgrade()
        yield s


def test_state_is_stored_replaced_listed_and_forgotten(store: HistoryStore) -> None:
    assert store.get_state("rebalance:planner") is None
    planner: dict[str, Any] = {"moved": [{"node": "node5", "dst": "inference", "at": T0.isoformat()}],
                               "want": None, "cycles": 2}  # fmt: skip
    store.put_state("rebalance:planner", planner)
    store.put_state("scaler:tiny", {"idle_since": None, "up": 1})
    store.put_state("scaler:tiny", {"idle_since": T0.isoformat(), "up": 0})  # replaced whole
    store.put_state("scaler:a_b%", {"up": 3})
    assert store.get_state("rebalance:planner") == planner
    assert store.states("scaler:") == {"scaler:tiny": {"idle_since": T0.isoformat(), "up": 0},
                                       "scaler:a_b%": {"up": 3}}  # fmt: skip
    assert store.states("scaler:a_") == {"scaler:a_b%": {"up": 3}}  # LIKE wildcards in a prefix are literal
    assert store.states("scaler:a%") == {}
    with store.engine.connect() as conn:
        stamps = set(conn.execute(select(ServiceStateRow.updated_at)).scalars())
    assert stamps == {T0}
    assert store.delete_state("scaler:tiny") and not store.delete_state("scaler:tiny")
    assert store.get_state("scaler:tiny") is None
    assert sorted(store.states("")) == ["rebalance:planner", "scaler:a_b%"]


def test_bad_names_and_values_are_refused(store: HistoryStore) -> None:
    with pytest.raises(StoreError, match="must be 1 to 128 characters"):
        store.put_state("x" * 129, {})
    with pytest.raises(StoreError, match="must be a JSON object"):
        store.put_state("scaler:x", [1, 2])  # type: ignore[arg-type]
    assert store.states("") == {}
