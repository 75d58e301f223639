"""Leases: a lease left by a dead process of this host is taken over at once; a live holder's, or another
host's, only once it expires; of two processes taking over the same dead holder's lease, one wins."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hpcserve.store import HistoryStore
from hpcserve.store.leases import dead_local_holder, holder_id, take_lease

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
HOST = socket.gethostname()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HistoryStore]:
    with HistoryStore(f"sqlite:///{tmp_path}/h.db") as s:
        s.upgrade()
        yield s


@pytest.fixture
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_pid() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_dead_local_holder(dead_pid: int, live_pid: int) -> None:
    assert dead_local_holder(f"{HOST}:{dead_pid}")
    assert not dead_local_holder(f"{HOST}:{live_pid}")
    assert not dead_local_holder(holder_id())  # ourselves
    assert not dead_local_holder(f"elsewhere-{HOST}:{dead_pid}")  # cannot tell for another host
    assert not dead_local_holder(None) and not dead_local_holder("") and not dead_local_holder(f"{HOST}:x")


def test_a_dead_holders_lease_is_taken_over_before_it_expires(store: HistoryStore, dead_pid: int) -> None:
    assert store.try_lock("rebalance", f"{HOST}:{dead_pid}", 3600, NOW)
    assert take_lease(store, "rebalance", "me:1", 60, NOW + timedelta(seconds=1))
    assert store.lock_holder("rebalance") == "me:1"


def test_a_live_or_remote_holders_lease_waits_for_its_ttl(store: HistoryStore, live_pid: int) -> None:
    assert store.try_lock("a", f"{HOST}:{live_pid}", 60, NOW)
    assert store.try_lock("b", f"other-host:{live_pid}", 60, NOW)
    for name in ("a", "b"):
        assert not take_lease(store, name, "me:1", 60, NOW + timedelta(seconds=59))
        assert take_lease(store, name, "me:1", 60, NOW + timedelta(seconds=60))


def test_two_takeovers_of_one_dead_holder_make_one_winner(store: HistoryStore, dead_pid: int) -> None:
    assert store.try_lock("rebalance", f"{HOST}:{dead_pid}", 3600, NOW)
    barrier, won = threading.Barrier(4), []

    def contend(i: int) -> None:
        barrier.wait()
        if take_lease(store, "rebalance", f"contender:{i}", 60, NOW):
            won.append(i)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and store.lock_holder("rebalance") == f"contender:{won[0]}"


def test_a_second_service_stands_by_for_the_sampler_and_retention(
    store: HistoryStore, live_pid: int, dead_pid: int
) -> None:
    from hpcserve.service.main import leased

    runs: list[str] = []
    active = leased(store, "sampler", 60, lambda: runs.append("active"), holder=f"{HOST}:{live_pid}")
    standby = leased(store, "sampler", 60, lambda: runs.append("standby"), holder=f"{HOST}:{os.getpid()}")
    assert active() and not standby() and active()
    assert runs == ["active", "active"]  # the standby samples nothing while the active one lives
    gone = leased(store, "retention", 7200, lambda: runs.append("gone"), holder=f"{HOST}:{dead_pid}")
    assert gone()
    heir = leased(store, "retention", 7200, lambda: runs.append("heir"), holder=f"{HOST}:{os.getpid()}")
    assert heir() and runs[-2:] == ["gone", "heir"]  # its holder died: taken over at once, not in 2 h
