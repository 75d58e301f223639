"""Model pools (pure): several deployments (members) share one pool of replica jobs, each job running one
engine per member, at most ``max_awake`` of them awake at once.

A pool is a row of the deployments table named after the pool, owned by its members' owner, whose spec is
``{"kind": "pool", "name": P, "max_awake": K, ...the replica shape and scaling}``. The spec is derived from
the members each time one joins or leaves (``pool_spec``): the shape (engine, GPUs, nodes, partition, time
limit, GPU fraction, MIG profile) is the members' (all must agree: ``shape_problem``), the scaling is the
most any member asks for (max of min/max replicas, of idle windows, of ``pool_max_awake``). Members have no
replicas of their own; the controller runs the pool row's replicas with ``as_replica_spec`` and the members'
specs, and scales them on the sum of the members' load, never below the awake floor (``awake_floor``).

The awake floor: a pool keeps at least ceil(members requested in the last ``use_window_s`` / K) jobs,
so that its awake slots (K per job) cover the models in use. On the summed load alone a pool of quiet
models runs on one job, where each job's agent wakes one model at a time: with more models in use than
K x jobs every request waits for a sleep and a wake, the wakes queue behind each other, and the warm
p99 TTFT grows to minutes (the residency replay measured it: ``hpcserve.replay.residency``). The floor
keeps its largest value over ``hold_s`` (the scale-down window), so that a pool does not start and
drain jobs as sparse models come and go; it is 0 once no member was requested within the window (the
pool then scales to zero as any deployment does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hpcserve.serving.spec import DeploymentSpec
    from hpcserve.store import Deployment

POOL_KIND = "pool"
SHAPE = ("engine", "gpus_per_replica", "nodes_per_replica", "partition", "time_limit", "gpu_fraction",
         "mig_profile")  # fmt: skip
MOST = ("min_replicas", "max_replicas", "target_waiting_per_replica", "scale_up_window_s",
        "scale_down_window_s", "idle_to_zero_s")  # fmt: skip
WINDOWS = ("warm_after_s", "off_after_s")  # the most any member sets; off only when every member sets it


def is_pool(spec: Mapping[str, Any]) -> bool:
    """Whether a stored spec is a pool row's."""
    return spec.get("kind") == POOL_KIND


def pool_of(spec: Mapping[str, Any]) -> str | None:
    """The pool a member's stored spec joins (None: not a member)."""
    pool = spec.get("pool")
    return str(pool) if pool and not is_pool(spec) else None


def members_of(deployments: Sequence[Deployment]) -> dict[str, list[Deployment]]:
    """Each pool's live members, by pool name."""
    found: dict[str, list[Deployment]] = {}
    for d in deployments:
        pool = pool_of(d.spec)
        if pool is not None and not d.deleted:
            found.setdefault(pool, []).append(d)
    return found


def shape_problem(pool: Mapping[str, Any], member: Mapping[str, Any]) -> str | None:
    """One line naming the first shape field where ``member`` differs from ``pool``, and the fix."""
    for key in SHAPE:
        if pool.get(key) != member.get(key):
            flag = "--" + key.replace("_", "-")
            return (f"{key}: pool {pool.get('name')!r} runs {key} {pool.get(key)!r}, this deployment "
                    f"{member.get(key)!r} (fix: give {flag} {pool.get(key)}, or join another "
                    "pool)")  # fmt: skip
    return None


def pool_spec(name: str, members: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The pool row's spec from its members' specs (at least one; the first one's shape)."""
    first = members[0]
    spec: dict[str, Any] = {"kind": POOL_KIND, "name": name}
    spec["max_awake"] = max(int(m.get("pool_max_awake") or 1) for m in members)
    spec |= {key: first.get(key) for key in SHAPE}
    spec |= {key: max(m[key] for m in members) for key in MOST if all(key in m for m in members)}
    warm = [m["warm_after_s"] for m in members if m.get("warm_after_s") is not None]
    spec["warm_after_s"] = max(warm) if warm else None
    off = [m.get("off_after_s") for m in members]
    spec["off_after_s"] = max(o for o in off if o is not None) if all(o is not None for o in off) else None
    return spec


def as_replica_spec(pool: Mapping[str, Any]) -> dict[str, Any]:
    """The pool's replica shape as a ``DeploymentSpec`` dict (name, served name and model: the pool's; the
    engines' models come from the members), for the launcher, the autoscaler and the limits."""
    spec = {key: value for key, value in pool.items() if key not in ("kind", "max_awake")}
    spec |= {"model": pool["name"], "served_model_name": pool["name"], "pool": pool["name"],
             "pool_max_awake": pool.get("max_awake") or 1}  # fmt: skip
    return {key: value for key, value in spec.items() if value is not None}


DEFAULT_USE_WINDOW_S = 600.0  # the awake floor's window for a pool that never scales to zero


@dataclass(frozen=True, slots=True)
class AwakeRule:
    """The awake floor's parameters (the module docstring): K, its windows and the pool's bound."""

    max_awake: int  # K: engines one job keeps awake
    use_window_s: float  # a member requested this recently is in use (the pool's idle_to_zero_s)
    hold_s: float  # the floor keeps its largest value this long (the pool's scale_down_window_s)
    max_replicas: int  # the floor never asks for more jobs than this

    @classmethod
    def of(cls, spec: DeploymentSpec) -> AwakeRule:
        """A pool's rule from its replicas' spec (``as_replica_spec``)."""
        window = spec.idle_to_zero_s if spec.scales_to_zero else DEFAULT_USE_WINDOW_S
        return cls(spec.pool_max_awake, window, spec.scale_down_window_s, spec.max_replicas)


@dataclass(frozen=True, slots=True)
class AwakeState:
    """What ``awake_floor`` remembers between ticks (start with ``AwakeState()``), as ``ScalerState``."""

    last_request: dict[str, datetime] = field(default_factory=dict)  # members in use: newest request seen
    raised_at: tuple[datetime, ...] = ()  # [k - 1]: the last tick the floor was k or more


def awake_floor(
    rule: AwakeRule, seen: Mapping[str, datetime | None], state: AwakeState, now: datetime
) -> tuple[int, AwakeState]:
    """The pool's awake floor this tick and the state for the next one. ``seen``: every member of the
    pool now, with the newest request seen for it this tick (None: none seen); a member that left the
    pool is forgotten."""
    newest = {name: max(t for t in (state.last_request.get(name), at) if t is not None)
              for name, at in seen.items() if at is not None or name in state.last_request}  # fmt: skip
    in_use = {name: at for name, at in newest.items() if _age(at, now) < rule.use_window_s}
    value = min(math.ceil(len(in_use) / max(rule.max_awake, 1)), rule.max_replicas)
    known = state.raised_at[: rule.max_replicas]
    raised = tuple(now if k <= value else at for k, at in enumerate(known, start=1))
    raised += (now,) * (value - len(raised))
    held = [k for k, at in enumerate(raised, start=1) if _age(at, now) < rule.hold_s]
    floor = max([value, *held]) if in_use else 0
    return floor, AwakeState(in_use, raised)


def _age(at: datetime, now: datetime) -> float:
    return (now - at).total_seconds()
