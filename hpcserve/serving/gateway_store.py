"""The gateway wired to hpcserve's database, read as the service account: routes from the deployments and
replicas tables (each deployment under its one served model name, with its owner and shares; each replica
with the engine key the gateway sends it; its overload settings from its spec), the live API keys with
their owners' Unix groups, its buffered and queued request samples into the engine samples (replica NULL,
what the autoscaler reads to scale from zero and to see demand waiting at the gateway), usage per key."""

from __future__ import annotations

import pwd
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from hpcserve.serving.gateway.keys import BURST_SECONDS, ApiKey, KeySnapshot, KeySource
from hpcserve.serving.gateway.routes import DeploymentRoute, Endpoint, Overload, Refresh, Routes
from hpcserve.serving.gateway.stats import GatewaySample, Report, UsageRow, UsageSink

if TYPE_CHECKING:
    from hpcserve.store import Deployment, HistoryStore, Replica
    from hpcserve.store.records import ApiKeyRecord


LIVE_GATEWAY_S = 10.0  # a gateway that wrote no sample for this long is not counted (it reports every 1 s)


def routes_from_store(store: HistoryStore) -> Refresh:
    """Every live deployment under its served model name, with its ready and draining replicas."""

    def refresh() -> Routes:
        deployments = [d for d in store.list_deployments() if not d.deleted]
        replicas: dict[str, list[Replica]] = {}
        for replica in store.replicas():
            replicas.setdefault(replica.deployment, []).append(replica)
        return served_routes(deployments, replicas)

    return refresh


def served_routes(deployments: Iterable[Deployment], replicas: dict[str, list[Replica]]) -> Routes:
    """The routes index: one entry per served model name. The database keeps ``served_model_name`` unique;
    a deployment without one (NULL, from before that rule) falls back to its spec, and never takes a name
    another deployment serves: names held in the column come first, then the oldest wins.

    A pool (a row whose spec has ``"kind": "pool"``) is no route: its members are, each served by the
    pool's replicas (a member's spec names its pool)."""
    table: dict[str, DeploymentRoute] = {}
    listed = list(deployments)
    pools = {d.name for d in listed if _is_pool(d)}
    for dep in sorted(listed, key=lambda d: (d.served_model_name is None, d.created_at, d.name)):
        if dep.name in pools:
            continue
        served = dep.served_model_name or str(dep.spec.get("served_model_name") or dep.name)
        pool = dep.spec.get("pool")
        jobs = replicas.get(str(pool), []) if pool in pools else replicas.get(dep.name, [])
        table.setdefault(served, _route(dep, served, jobs))
    return table


def _is_pool(deployment: Deployment) -> bool:
    return deployment.spec.get("kind") == "pool"


def _route(deployment: Deployment, served: str, replicas: list[Replica]) -> DeploymentRoute:
    serving = [r for r in replicas if r.url and r.state in ("ready", "draining")]
    endpoints = [e for e in (_endpoint(deployment.name, served, r) for r in serving) if e is not None]
    return DeploymentRoute(
        name=deployment.name,
        endpoints=tuple(endpoints),
        draining=frozenset(r.index for r in serving if r.state == "draining"),
        owner=deployment.owner,
        shares=frozenset(deployment.shares or ()),
        overload=spec_overload(deployment.spec),
        tier=deployment.tier,
    )


def _endpoint(name: str, served: str, replica: Replica) -> Endpoint | None:
    """The replica's engine for ``served``: the replica itself, or, for a replica with an agent (it
    announced ``models``), that model's engine on the replica's host, woken through the agent (None: the
    replica runs no engine for it)."""
    if replica.models is None:
        return Endpoint(name, replica.index, str(replica.url), replica.engine_key)
    port = replica.models.get(served)
    if port is None or not replica.host:
        return None
    return Endpoint(
        name, replica.index, f"http://{replica.host}:{port}", replica.engine_key, str(replica.url)
    )


def spec_overload(spec: Mapping[str, Any]) -> Overload:
    """The overload settings of a stored spec, defaults filled in; a spec that no longer validates (an
    older hpcserve's) gets none: no bound, as before overload handling."""
    from pydantic import ValidationError

    from hpcserve.serving.spec import DeploymentSpec

    try:
        return DeploymentSpec.model_validate(spec).overload
    except (ValidationError, ValueError):
        return Overload()


def keys_from_store(store: HistoryStore, source: str | None = None) -> KeySource:
    """The keys not revoked, with the Unix groups of their owners (for shares with ``@group``).

    Rate limits hold across gateways by splitting: each key's rate and burst are divided by the number of
    live gateways (those that wrote a sample within ``LIVE_GATEWAY_S``, this one included). Chosen over a
    bucket shared through the database, which would put a database write on every request's path; the
    split is exact when a load balancer spreads a key's requests evenly, and otherwise errs on the strict
    side (a client stuck to one gateway of n gets 1/n of its rate), never above the key's rate in total."""

    def refresh() -> KeySnapshot:
        since = datetime.now(UTC) - timedelta(seconds=LIVE_GATEWAY_S)
        live = set(store.gateway_sources(since)) | ({source} if source else set())
        share = 1 / max(len(live), 1)
        keys = tuple(gateway_key(k, share) for k in store.api_keys(live_only=True))
        return KeySnapshot(keys, owner_groups({k.owner for k in keys}))

    return refresh


def gateway_key(record: ApiKeyRecord, share: float = 1.0) -> ApiKey:
    """The gateway's key for a stored one; ``share``: this gateway's part of its rate limit."""
    models = frozenset(record.models) if record.models is not None else None
    rate, burst = record.rate, record.burst
    if rate and share < 1:
        rate, burst = rate * share, (burst or rate * BURST_SECONDS) * share
    return ApiKey(record.id, record.owner, rate=rate, burst=burst, max_tokens=record.max_tokens,
                  models=models, salt=record.salt, digest=record.digest, priority=record.priority,
                  allow_fallback=record.allow_fallback)  # fmt: skip


def owner_groups(owners: Iterable[str]) -> dict[str, frozenset[str]]:
    """Each user's Unix groups (primary and supplementary); a user with no passwd entry has none."""
    from hpcserve.api.caller import caller_for_uid

    groups = {}
    for owner in owners:
        try:
            uid = pwd.getpwnam(owner).pw_uid
        except KeyError:
            groups[owner] = frozenset[str]()
            continue
        groups[owner] = caller_for_uid(uid).groups
    return groups


def report_to_store(store: HistoryStore, source: str | None = None) -> Report:
    """The gateway's buffered and queued requests per deployment into the history, named by ``source`` (this
    gateway's host:port), so that with several gateways the autoscaler sums them all."""
    from hpcserve.store import EngineSample

    def report(samples: Sequence[GatewaySample]) -> None:
        store.add_engine_samples(
            [
                EngineSample(s.at, s.deployment, None, gateway_waiting=s.buffered + s.queued, source=source)
                for s in samples
            ]
        )

    return report


def usage_to_store(store: HistoryStore) -> UsageSink:
    def sink(rows: Sequence[UsageRow]) -> None:
        for row in rows:
            store.add_usage(row.key_id, row.deployment, row.at.date(), row.requests, row.prompt_tokens,
                            row.completion_tokens)  # fmt: skip

    return sink
