"""The gateway wired to hpcserve's database: routes from the replicas table, its buffered-request samples
into the engine samples (replica NULL, what the autoscaler reads to scale from zero), usage per key."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hpcserve.serving.gateway.routes import DeploymentRoute, Endpoint, Refresh, Routes, index_routes
from hpcserve.serving.gateway.stats import GatewaySample, Report, UsageRow, UsageSink

if TYPE_CHECKING:
    from hpcserve.store import Deployment, HistoryStore, Replica


def routes_from_store(store: HistoryStore) -> Refresh:
    """Every live deployment, under its name and served model name, with its ready and draining replicas."""

    def refresh() -> Routes:
        deployments = [d for d in store.list_deployments() if not d.deleted]
        replicas: dict[str, list[Replica]] = {}
        for replica in store.replicas():
            replicas.setdefault(replica.deployment, []).append(replica)
        routes = [_route(d, replicas.get(d.name, [])) for d in deployments]
        aliases = {d.name: [str(d.spec.get("served_model_name") or d.name)] for d in deployments}
        return index_routes(routes, aliases)

    return refresh


def _route(deployment: Deployment, replicas: list[Replica]) -> DeploymentRoute:
    serving = [r for r in replicas if r.url and r.state in ("ready", "draining")]
    return DeploymentRoute(
        name=deployment.name,
        endpoints=tuple(Endpoint(deployment.name, r.index, str(r.url)) for r in serving),
        draining=frozenset(r.index for r in serving if r.state == "draining"),
    )


def report_to_store(store: HistoryStore) -> Report:
    from hpcserve.store import EngineSample

    def report(samples: Sequence[GatewaySample]) -> None:
        store.add_engine_samples(
            [EngineSample(s.at, s.deployment, None, gateway_waiting=s.buffered) for s in samples]
        )

    return report


def usage_to_store(store: HistoryStore) -> UsageSink:
    def sink(rows: Sequence[UsageRow]) -> None:
        for row in rows:
            store.add_usage(row.key_id, row.deployment, row.at.date(), row.requests, row.prompt_tokens,
                            row.completion_tokens)  # fmt: skip

    return sink
