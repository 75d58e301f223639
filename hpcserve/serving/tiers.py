"""Residency tiers (pure): which tier a deployment should be in now, and why.

- hot: awake on its GPUs;
- warm: its replica jobs kept, every engine asleep (level 1: the weights in host RAM), woken on demand by
  the gateway in seconds;
- cold: no job (the autoscaler scaled it to zero), the weights staged on node-local disk;
- off: nothing staged.

Down the tiers after idle windows, counted from the autoscaler's last tick with any request (arriving,
queued, running or held at a gateway: ``ScalerState.last_traffic``): ``warm_after_s`` -> warm,
``idle_to_zero_s`` -> cold (only where the deployment scales to zero), ``off_after_s`` -> off. Up on any
demand: a request now, or the forecast's replica floor (pre-warm) -> hot. A window that is not set skips
its tier (no ``warm_after_s``: hot straight to cold).

``decide_tier`` reads no clock and does no I/O: the controller passes what it loaded and ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcserve.serving.spec import DeploymentSpec


class Tier(StrEnum):
    HOT = "hot"
    WARM = "warm"
    COLD = "cold"
    OFF = "off"

    @property
    def has_jobs(self) -> bool:
        """Whether the deployment keeps replica jobs in this tier (hot and warm)."""
        return self in (Tier.HOT, Tier.WARM)

    @classmethod
    def of(cls, stored: str | None) -> Tier:
        """The stored tier (None, never moved: hot)."""
        return cls(stored) if stored else cls.HOT


@dataclass(frozen=True, slots=True)
class TierWindows:
    """Idle seconds before each lower tier; None: that tier is skipped."""

    warm_after_s: float | None = None
    cold_after_s: float | None = None
    off_after_s: float | None = None

    @classmethod
    def of(cls, spec: DeploymentSpec) -> TierWindows:
        """A spec's windows: cold only where it scales to zero, off only after cold."""
        cold = spec.idle_to_zero_s if spec.scales_to_zero else None
        return cls(spec.warm_after_s, cold, spec.off_after_s if cold is not None else None)

    def by_idle(self, idle_s: float) -> tuple[Tier, str]:
        """The lowest tier whose window ``idle_s`` has passed, and why."""
        for tier, window in ((Tier.OFF, self.off_after_s), (Tier.COLD, self.cold_after_s),
                             (Tier.WARM, self.warm_after_s)):  # fmt: skip
            if window is not None and idle_s >= window:
                return tier, f"no requests for {idle_s:.0f}s (>= {window:g}s)"
        return Tier.HOT, f"a request {idle_s:.0f}s ago"


@dataclass(frozen=True, slots=True)
class TierDecision:
    """The tier to be in, why, and whether it differs from the current one."""

    tier: Tier
    reason: str
    changed: bool

    @property
    def woken_by_floor(self) -> bool:
        return self.changed and self.tier is Tier.HOT and self.reason.startswith("forecast floor")


def decide_tier(
    windows: TierWindows,
    current: Tier,
    last_traffic: datetime | None,
    now: datetime,
    demand: bool = False,
    floor: int = 0,
) -> TierDecision:
    """The tier for this tick. ``demand``: a request now (held at a gateway, queued or running);
    ``floor``: the forecast's replica floor (pre-warm), > 0 holds the deployment hot; ``last_traffic``:
    the last tick with any request (None: never seen, the current tier stays)."""
    if demand:
        return _decision(Tier.HOT, "a request is waiting or running", current)
    if floor > 0:
        return _decision(Tier.HOT, f"forecast floor {floor} (pre-warm)", current)
    if last_traffic is None:
        return _decision(current, "no request seen yet", current)
    tier, why = windows.by_idle((now - last_traffic).total_seconds())
    return _decision(tier, why, current)


def _decision(tier: Tier, why: str, current: Tier) -> TierDecision:
    return TierDecision(tier, why, tier is not current)
