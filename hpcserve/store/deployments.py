"""Deployments (desired state, owned by a Unix user) and their replicas.

Changes go through one guarded UPDATE (``WHERE owner = user`` unless the user is an admin), so the
ownership check and the change cannot be split by another writer. A deleted deployment whose replicas still
run keeps its row (``deleted_at`` set, desired 0) until the reconciler removes its last replica.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, exists, func, select, update
from sqlalchemy.exc import IntegrityError

from hpcserve.errors import ValidationError
from hpcserve.store.errors import DeploymentExists, NotFound, NotOwner, ServedNameTaken
from hpcserve.store.records import (
    REPLICA_STATES,
    Deployment,
    DeploymentExtra,
    Replica,
    ReplicaFields,
    check_state,
)
from hpcserve.store.schema import DeploymentRow, ReplicaRow
from hpcserve.store.sql import dialect_insert, select_record, to_records

D, R = DeploymentRow, ReplicaRow
REPLICA_FIELDS = frozenset(ReplicaFields.__optional_keys__)
TIERS = ("hot", "warm", "cold", "off")


def create(
    conn: Connection, name: str, owner: str, spec: Mapping[str, Any], desired: int, now: datetime,
    extra: DeploymentExtra | None = None,
) -> Deployment:  # fmt: skip
    """Insert the deployment; ``DeploymentExists`` when the name is taken, ``ServedNameTaken`` when another
    deployment already serves its model name."""
    extra = extra or {}
    served = extra.get("served_model_name") or str(spec.get("served_model_name") or name)
    _check_served_name_free(conn, name, served)
    values = {"name": name, "owner": owner, "spec": dict(spec), "generation": 1, "served_model_name": served}
    values |= {"desired_replicas": _count(desired), "created_at": now, "updated_at": now, "deleted_at": None}
    values |= {"account": extra.get("account"), "shares": extra.get("shares")}
    inserted = dialect_insert(conn, D).values(values).on_conflict_do_nothing().returning(D.name)
    try:
        found = conn.execute(inserted).scalar_one_or_none()
    except IntegrityError:  # the served name was taken between the check and the insert
        raise ServedNameTaken(served, None) from None
    if found is None:  # (an INSERT's rowcount is not portable)
        raise DeploymentExists(name, stopping=_get(conn, name).deleted)
    return _get(conn, name)


def _check_served_name_free(conn: Connection, name: str, served: str) -> None:
    holder = conn.execute(
        select(D.name, D.owner).where(D.served_model_name == served, D.name != name)
    ).first()
    if holder is not None:
        raise ServedNameTaken(served, holder.name)


def set_shares(conn: Connection, name: str, shares: list[str], user: str, admin: bool, now: datetime) -> None:
    _change(conn, name, user, admin, {"shares": list(shares), "updated_at": now})


def get(conn: Connection, name: str) -> Deployment | None:
    rows = to_records(conn.execute(select_record(D, Deployment).where(D.name == name)), Deployment)
    return rows[0] if rows else None


def list_all(conn: Connection) -> list[Deployment]:
    return to_records(conn.execute(select_record(D, Deployment).order_by(D.name)), Deployment)


def set_desired(conn: Connection, name: str, replicas: int, user: str, admin: bool, now: datetime) -> None:
    _change(conn, name, user, admin, {"desired_replicas": _count(replicas), "updated_at": now})


def update_spec(
    conn: Connection, name: str, spec: Mapping[str, Any], user: str, admin: bool, now: datetime
) -> None:
    _change(conn, name, user, admin, {"spec": dict(spec), "generation": D.generation + 1, "updated_at": now})


def delete_deployment(conn: Connection, name: str, user: str, admin: bool, now: datetime) -> bool:
    """Mark the deployment deleted (desired 0); remove its row at once when it has no replicas left.
    True when the row is gone."""
    changes = {"desired_replicas": 0, "deleted_at": func.coalesce(D.deleted_at, now), "updated_at": now}
    _change(conn, name, user, admin, changes, live_only=False)
    return purge_if_done(conn, name)


def set_tier(conn: Connection, name: str, tier: str, now: datetime) -> None:
    """The residency tier the service chose (hot, warm, cold, off), since ``now``; the service's own write."""
    check_state("tier", tier, TIERS)
    conn.execute(update(D).where(D.name == name).values(tier=tier, tier_since=now))


PoolSpecOf = Callable[[str, list[dict[str, Any]]], dict[str, Any]]  # pool name, members' specs -> its spec


def join_pool(
    conn: Connection, name: str, owner: str, spec: Mapping[str, Any], pool: str, pool_spec: PoolSpecOf,
    now: datetime, extra: DeploymentExtra,
) -> Deployment:  # fmt: skip
    """Insert member ``name`` (no replicas of its own) and create or update its pool's row, in one
    transaction. ``NotOwner`` when the pool is another user's; ``ValidationError`` when ``pool`` names a
    deployment."""
    found = get(conn, pool)
    if found is not None and found.spec.get("kind") != "pool":
        raise ValidationError(f"pool: {pool!r} is a deployment, not a pool (fix: pick another --pool name)")
    if found is not None and found.owner != owner:
        raise NotOwner(pool, found.owner, owner)
    if found is not None and found.deleted:
        raise DeploymentExists(pool, stopping=True)
    created = create(conn, name, owner, spec, 0, now, extra)
    _refresh_pool(conn, pool, owner, pool_spec, now, found)
    return created


def leave_pool(conn: Connection, pool: str, pool_spec: PoolSpecOf, now: datetime) -> None:
    """After a member left: the pool's spec from the members left, or the pool deleted with the last one
    (its replicas stop as a deleted deployment's)."""
    found = get(conn, pool)
    if found is not None and not found.deleted:
        _refresh_pool(conn, pool, found.owner, pool_spec, now, found)


def pool_members(conn: Connection, pool: str) -> list[Deployment]:
    """The live deployments whose spec joins ``pool``."""
    return [d for d in list_all(conn) if d.spec.get("pool") == pool and d.spec.get("kind") != "pool"
            and not d.deleted]  # fmt: skip


def _refresh_pool(
    conn: Connection, pool: str, owner: str, pool_spec: PoolSpecOf, now: datetime, found: Deployment | None
) -> None:
    members = [m.spec for m in pool_members(conn, pool)]
    if not members:
        if found is not None:
            delete_deployment(conn, pool, owner, True, now)
        return
    spec = pool_spec(pool, members)
    if found is None:
        create(conn, pool, owner, spec, 0, now, {"served_model_name": pool})
    elif found.spec != spec:
        update_spec(conn, pool, spec, owner, True, now)


def purge_if_done(conn: Connection, name: str) -> bool:
    """Remove a deleted deployment that has no replicas left; whether it was removed."""
    no_replicas = ~exists().where(R.deployment == name)
    stmt = delete(D).where(D.name == name, D.deleted_at.is_not(None), no_replicas)
    return conn.execute(stmt).rowcount > 0


def _change(
    conn: Connection, name: str, user: str, admin: bool, values: dict[str, Any], live_only: bool = True
) -> None:
    stmt = update(D).where(D.name == name).values(values)
    if live_only:
        stmt = stmt.where(D.deleted_at.is_(None))
    if not admin:
        stmt = stmt.where(D.owner == user)
    if conn.execute(stmt).rowcount == 0:
        raise _refusal(conn, name, user, live_only)


def _refusal(conn: Connection, name: str, user: str, live_only: bool) -> Exception:
    found = get(conn, name)
    if found is None or (live_only and found.deleted):
        return _missing(name)
    return NotOwner(name, found.owner, user)


def _get(conn: Connection, name: str) -> Deployment:
    found = get(conn, name)
    if found is None:
        raise _missing(name)
    return found


def _missing(name: str) -> NotFound:
    return NotFound(f"no deployment {name!r}: `hpcserve deployments` lists them")


def _count(replicas: int) -> int:
    if replicas < 0:
        raise ValidationError(f"replicas: {replicas} is negative; use 0 or more")
    return replicas


def upsert_replica(
    conn: Connection, deployment: str, index: int, fields: ReplicaFields, now: datetime
) -> Replica:
    """Insert the replica or update the fields given (the rest keep their values)."""
    unknown = set(fields) - REPLICA_FIELDS
    if unknown:
        raise ValidationError(f"unknown replica fields {sorted(unknown)}: use {sorted(REPLICA_FIELDS)}")
    if "state" in fields:
        check_state("replica state", fields["state"], REPLICA_STATES)
    _get(conn, deployment)
    insert = dialect_insert(conn, R).values(
        {"state": "pending", **fields, "deployment": deployment, "index": index, "updated_at": now}
    )
    changed = [*fields, "updated_at"]
    upsert = insert.on_conflict_do_update(
        index_elements=["deployment", "index"], set_={k: insert.excluded[k] for k in changed}
    )
    conn.execute(upsert)
    return replicas(conn, deployment, index)[0]


def replicas(conn: Connection, deployment: str | None, index: int | None = None) -> list[Replica]:
    stmt = select_record(R, Replica).order_by(R.deployment, R.index)
    if deployment is not None:
        stmt = stmt.where(R.deployment == deployment)
    if index is not None:
        stmt = stmt.where(R.index == index)
    return to_records(conn.execute(stmt), Replica)


def remove_replica(conn: Connection, deployment: str, index: int) -> bool:
    """Forget a replica (its job has ended); a deleted deployment goes with its last replica."""
    removed = conn.execute(delete(R).where(R.deployment == deployment, R.index == index)).rowcount > 0
    purge_if_done(conn, deployment)
    return removed
