"""What every API call works with: the service's own config (root-owned files, never the caller's), its
store, its Slurm client (the service's shared view of Slurm, whose writes pass through), its clock, and
the owners of running jobs it verified recently."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from hpcserve.api.job_owners import JobOwners

if TYPE_CHECKING:
    from hpcserve.config import Policy, SiteConfig
    from hpcserve.slurm.protocol import SlurmClient
    from hpcserve.store import HistoryStore


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ApiContext:
    site: SiteConfig
    policy: Policy
    store: HistoryStore
    slurm: SlurmClient
    clock: Callable[[], datetime] = field(default=_utc_now)
    job_owners: JobOwners = field(default_factory=JobOwners)  # running jobs' owners, verified recently
