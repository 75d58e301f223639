"""Named leases in the database (the service's leader locks): who we are, and taking a lease over from a
holder that died.

A holder is ``host:pid`` (or ``host:pid/role`` for a second holder inside one process). A lease normally
frees itself when its ttl runs out; a process restarted after a crash (kill -9, OOM) on the same host need
not wait for that: when the holder named in the lease is a process of this host that no longer exists, the
lease is taken over at once. The takeover is atomic (it
only succeeds while that dead holder is still the one named), so two restarted processes cannot both win.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcserve.store import HistoryStore

log = logging.getLogger("hpcserve.lease")


def holder_id() -> str:
    """This process as a lease holder: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def dead_local_holder(holder: str | None) -> bool:
    """Whether ``holder`` names a process of this host (not this one) that no longer exists."""
    if not holder:
        return False
    host, _, pid_text = holder.rpartition(":")
    pid_text = pid_text.partition("/")[0]  # "host:pid/api": a second holder inside the same process
    if host != socket.gethostname() or not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def take_lease(store: HistoryStore, name: str, holder: str, ttl_s: float, now: datetime) -> bool:
    """Take or renew the lease ``name`` for ``holder``; a lease left by a dead process of this host is
    taken over without waiting for its ttl. Whether ``holder`` has it now."""
    if store.try_lock(name, holder, ttl_s, now):
        return True
    previous = store.lock_holder(name)
    if not dead_local_holder(previous):
        return False
    taken = store.try_lock(name, holder, ttl_s, now, stale=previous)
    if taken:
        log.warning("lease %r: its holder %s is gone (crashed?); taken over by %s", name, previous, holder)
    return taken


def leases_held(store: HistoryStore, holder: str, now: datetime) -> dict[str, bool]:
    """Every lease in the database by name: whether ``holder`` holds it at ``now`` (named and unexpired)."""
    from sqlalchemy import select

    from hpcserve.store.schema import LockRow

    with store.engine.connect() as conn:
        rows = conn.execute(select(LockRow.name, LockRow.holder, LockRow.expires_at)).all()
    return {name: who == holder and until > now for name, who, until in rows}
