"""Read-side views for the CLI: nodes joined with the site's fabric map, jobs with their wait time."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from hpcserve.slurm.models import Job, Node

if TYPE_CHECKING:
    from hpcserve.config import SiteConfig


@dataclass(frozen=True, slots=True)
class NodeView:
    name: str
    partitions: tuple[str, ...]
    state: str
    available: bool
    gpus_free: int
    gpus_total: int
    gpu_type: str | None
    switch: str | None
    fabric: str | None
    features: tuple[str, ...]
    reason: str


def node_views(nodes: Iterable[Node], site: SiteConfig | None) -> list[NodeView]:
    return [_node_view(n, site) for n in sorted(nodes, key=lambda n: (n.switch or "", _natural(n.name)))]


def _node_view(node: Node, site: SiteConfig | None) -> NodeView:
    fabric = site.fabric_of(node.name) if site else None
    return NodeView(
        name=node.name, partitions=node.partitions, state=node.display_state, available=node.available,
        gpus_free=node.gpus_free, gpus_total=node.gpus_total, gpu_type=node.gpu_type, switch=node.switch,
        fabric=fabric[0] if fabric else None, features=node.features, reason=node.reason,
    )  # fmt: skip


def _natural(name: str) -> tuple[str, int]:
    stem = name.rstrip("0123456789")
    digits = name[len(stem) :]
    return stem, int(digits) if digits else -1


def job_record(job: Job, now: datetime) -> dict[str, Any]:
    """One job as ``hpcserve ps --json`` prints it: the fields of ``Job`` plus ``tag`` and ``wait_s``.
    Datetimes and enums stay typed (orjson writes ISO 8601 and the enum's value). Written out as one dict
    literal because it runs 10,000 times per call."""
    (id_, job_id, name, user, account, partition, state, num_nodes, nodes, gpus, qos, submit, start,
     time_limit_s, reason, comment) = job  # fmt: skip
    wait = job.wait_s(now)
    return {
        "id": id_, "job_id": job_id, "name": name, "user": user, "account": account, "partition": partition,
        "state": state, "num_nodes": num_nodes, "nodes": nodes, "gpus": gpus, "qos": qos, "submit": submit,
        "start": start, "time_limit_s": time_limit_s, "reason": reason, "comment": comment, "tag": job.tag,
        "wait_s": None if wait is None else round(wait, 1),
    }  # fmt: skip


def jobs_json(jobs: Iterable[Job], now: datetime) -> bytes:
    """A JSON array of job records, encoded by orjson in C (the stdlib encoder was the slowest step)."""
    return orjson.dumps([job_record(j, now) for j in jobs])
