"""Model pools (pure): several deployments (members) share one pool of replica jobs, each job running one
engine per member, at most ``max_awake`` of them awake at once.

A pool is a row of the deployments table named after the pool, owned by its members' owner, whose spec is
``{"kind": "pool", "name": P, "max_awake": K, ...the replica shape and scaling}``. The spec is derived from
the members each time one joins or leaves (``pool_spec``): the shape (engine, GPUs, nodes, partition, time
limit, GPU fraction, MIG profile) is the members' (all must agree: ``shape_problem``), the scaling is the
most any member asks for (max of min/max replicas, of idle windows, of ``pool_max_awake``). Members have no
replicas of their own; the controller runs the pool row's replicas with ``as_replica_spec`` and the members'
specs, and scales them on the sum of the members' load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

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
