"""Cluster-level reads for everyone, and the admin actions, behind the service API.

Reads (``history``, ``lost_work``, ``plans``) are cluster facts with no per-user data beyond what squeue
shows everyone: every caller may see them. The actions (``rebalance``, ``move``, ``drain``) are for admins
only (``admins`` in the service's site config, users or ``@group``): one ``Forbidden`` line otherwise.
``rebalance`` and ``move`` act only on the site's managed pool, through the rebalancer's executor (a round
under the "rebalance" lease); ``drain`` takes any node down for maintenance, and the service moves its
replicas off it (``hpcserve drain-node``).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from hpcserve.api.caller import is_admin
from hpcserve.errors import ValidationError

if TYPE_CHECKING:
    from hpcserve.api.caller import Caller
    from hpcserve.api.context import ApiContext
    from hpcserve.config import SiteConfig
    from hpcserve.rebalance.control import Rebalancer, RoundReport
    from hpcserve.rebalance.types import RebalancePlan, Side
    from hpcserve.slurm.protocol import SlurmOperator
    from hpcserve.store import HistoryStore, LostWork, Plan, QueueSample

RECENT_PLANS = 20
MAX_PLANS = 500
MAX_REASON = 200
API_HOLDER_SUFFIX = "/api"  # the API's rebalance rounds hold the lease apart from the service's own job


# -------------------------------------------------------------------------------------------- reads


def history(
    api: ApiContext, caller: Caller, partition: str | None, since_s: float, limit: int
) -> dict[str, Any]:
    """Queue samples of the last ``since_s`` seconds (the newest ``limit``; 0: all), how many there
    were, and the training/inference split over that time (nodes per side) for a plot."""
    if since_s <= 0:
        raise ValidationError("since: must be a positive number of seconds (fix: e.g. --since 24h)")
    start = api.clock() - timedelta(seconds=since_s)
    samples = api.store.queue_samples(partition, since=start)
    shown = samples[-limit:] if limit > 0 else samples
    split = split_points(api.site, api.store, start)
    return {"samples": [sample_json(s) for s in shown], "total": len(samples),
            "split": [[at.isoformat(), train, infer] for at, train, infer in split],
            "roles": api.site.partition_names()}  # fmt: skip


def lost_work(api: ApiContext, caller: Caller, since_s: float) -> dict[str, Any]:
    """The training jobs evicted for replicas (``lending: overlap``) in the last ``since_s`` seconds, each
    with the GPU-hours it lost, and the total. Like squeue's and sacct's default view, every user sees every
    job's id and user: no more than Slurm itself shows them."""
    if since_s <= 0:
        raise ValidationError("since: must be a positive number of seconds (fix: e.g. --since 24h)")
    rows = api.store.lost_work(since=api.clock() - timedelta(seconds=since_s))
    total = round(sum(r.lost_gpu_h for r in rows), 3)
    return {"evictions": [lost_json(r) for r in rows], "lost_gpu_h": total}


def lost_json(row: LostWork) -> dict[str, Any]:
    return {"at": row.at.isoformat(), "job_id": row.job_id, "user": row.user, "node": row.node,
            "gpus": row.gpus, "lost_gpu_h": round(row.lost_gpu_h, 3), "deployment": row.deployment,
            "replica_job_id": row.replica_job_id}  # fmt: skip


def sample_json(sample: QueueSample) -> dict[str, Any]:
    return {"at": sample.at.isoformat(), "partition": sample.partition, "pending_jobs": sample.pending_jobs,
            "pending_gpus": sample.pending_gpus, "running_gpus": sample.running_gpus,
            "idle_gpus": sample.idle_gpus, "total_gpus": sample.total_gpus}  # fmt: skip


def split_points(site: SiteConfig, store: HistoryStore, start: datetime) -> list[tuple[datetime, int, int]]:
    """Nodes per side from ``start`` on: the site's starting split, then each move carried out."""
    from hpcserve.rebalance.split import split_timeline
    from hpcserve.rebalance.types import Side

    base: dict[str, Side] = dict.fromkeys(site.partitions.training.nodes, Side.TRAINING)
    base.update(dict.fromkeys(site.partitions.inference.nodes, Side.INFERENCE))
    moves = [(s.finished_at, s.node, Side(s.dst)) for s in store.done_moves() if s.finished_at is not None]
    return split_timeline(start, base, moves)


def plans(api: ApiContext, caller: Caller, last: int = RECENT_PLANS) -> list[dict[str, Any]]:
    """The newest ``last`` rebalance plans: state, who last ran them, when they finished."""
    if not 1 <= last <= MAX_PLANS:
        raise ValidationError(f"last: {last} is not between 1 and {MAX_PLANS}")
    return [stored_plan_json(p) for p in api.store.plans(last=last)]


def stored_plan_json(plan: Plan) -> dict[str, Any]:
    return {"id": plan.id, "state": plan.state, "created_at": plan.created_at.isoformat(),
            "finished_at": plan.finished_at.isoformat() if plan.finished_at else None,
            "holder": plan.holder, "moves": plan.moves, "reason": plan.reason}  # fmt: skip


# ------------------------------------------------------------------------------------ admin actions


def require_admin(api: ApiContext, caller: Caller, action: str) -> None:
    from hpcserve.api.errors import Forbidden

    if not is_admin(caller, api.site.admins):
        raise Forbidden(
            f"{action} is for admins: {caller.user} is not one (`admins` in the service's site config, "
            "users or @group)"
        )


def rebalance(api: ApiContext, caller: Caller, dry_run: bool) -> dict[str, Any]:
    """One rebalancer round now, under the "rebalance" lease (``dry_run``: only what it would plan)."""
    from hpcserve.rebalance.control import default_plan_fn

    require_admin(api, caller, "rebalance")
    rebalancer = _rebalancer(api, default_plan_fn())
    if dry_run:
        return {"dry_run": True, "plan": plan_json(rebalancer.plan()[0])}
    return {"dry_run": False, **report_json(rebalancer.round())}


def move(api: ApiContext, caller: Caller, node: str, side: str, dry_run: bool = False,
         grace_s: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Move one managed-pool node to ``side`` (training or inference) through the executor."""
    require_admin(api, caller, "move")
    _check_managed(api.site, node)
    wanted = {node: parse_side(side)}
    if grace_s is not None and grace_s < 0:
        raise ValidationError(f"grace_s: {grace_s} is negative (fix: 0 or more seconds)")
    rebalancer = _rebalancer(api, None)
    if dry_run:
        return {"dry_run": True, "plan": plan_json(rebalancer.manual_plan(wanted, grace_s))}
    return {"dry_run": False, **report_json(rebalancer.round(wanted, grace_s))}


def drain(api: ApiContext, caller: Caller, node: str, reason: str) -> dict[str, Any]:
    """Drain one node for maintenance (running jobs go on, nothing new starts there) with the admin's
    reason. The service hands each replica on it over as it does before a time limit: a successor starts
    elsewhere, the old replica gets no new requests, and is cancelled once its requests finished. Any node
    Slurm knows, not only the managed pool: maintenance is not a move between sides."""
    require_admin(api, caller, "drain")
    if (
        not isinstance(reason, str)
        or not reason.strip()
        or not reason.isprintable()
        or len(reason) > MAX_REASON
    ):
        raise ValidationError(f"reason: give one printable line of at most {MAX_REASON} characters")
    if node not in {n.name for n in api.slurm.nodes()}:
        raise ValidationError(f"node: {node!r} is not a node of this cluster (fix: see `hpcserve nodes`)")
    said = f"{reason.strip()} (drained by {caller.user} through hpcserve)"
    _operator(api).drain([node], said)
    return {"node": node, "drained": True, "reason": said, "moving": _replicas_on(api, node)}


def _replicas_on(api: ApiContext, node: str) -> list[dict[str, Any]]:
    """The service's replicas whose job runs on ``node``: they move off it."""
    jobs = {str(j.job_id): j for j in api.slurm.jobs() if node in j.nodes}
    moving = []
    for deployment in api.store.list_deployments():
        for r in api.store.replicas(deployment.name):
            job = jobs.get((r.job_id or "").split("_")[0])
            if job is not None and job.user == deployment.owner:
                moving.append({"deployment": deployment.name, "replica": r.index, "job_id": r.job_id})
    return moving


def _check_managed(site: SiteConfig, node: str) -> None:
    from hpcserve.rebalance.split import Layout

    layout = Layout.from_site(site)
    if not layout.managed(node):
        pool = ", ".join(sorted(layout.start)) or "empty"
        raise ValidationError(f"node: {node!r} is not in the site's managed pool (fix: pick one of: {pool})")


def _operator(api: ApiContext) -> SlurmOperator:
    """The service's Slurm client when it has the operator writes, else the CLI backend (as the
    service's scheduled rebalancer uses)."""
    from hpcserve.slurm.cli_backend import CliSlurmClient
    from hpcserve.slurm.protocol import SlurmOperator

    if isinstance(api.slurm, SlurmOperator):
        return api.slurm
    return CliSlurmClient(timeout=api.site.slurm.command_timeout_s)


def _rebalancer(api: ApiContext, plan_fn: Any) -> Rebalancer:
    """A rebalancer for one round. Its lease holder is this process plus ``/api``: the service's
    scheduled rebalancer runs in this same process as ``host:pid``, and the lease must keep the two
    apart (a holder renews its own lease)."""
    from hpcserve.rebalance.control import Rebalancer
    from hpcserve.store.leases import holder_id

    holder = holder_id() + API_HOLDER_SUFFIX
    return Rebalancer(
        _operator(api), api.store, api.site, api.policy, plan_fn, clock=api.clock, holder=holder
    )


def plan_json(plan: RebalancePlan) -> dict[str, Any]:
    from hpcserve.rebalance.steps import move_to_json

    return {"target_inference_nodes": plan.target_inference_nodes,
            "moves": [move_to_json(m) for m in plan.moves], "reasons": list(plan.reasons)}  # fmt: skip


def report_json(report: RoundReport) -> dict[str, Any]:
    return {
        "locked": report.locked, "resumed_plans": list(report.resumed),
        "resumed_nodes": list(report.repaired),
        "reasserted": {name: list(nodes) for name, nodes in report.reasserted.items()},
        "plan": plan_json(report.plan) if report.plan is not None else None,
        "plan_id": report.plan_id, "state": report.state, "moves_applied": report.moves_applied,
    }  # fmt: skip


def parse_side(side: str) -> Side:
    from hpcserve.rebalance.types import Side

    try:
        return Side(side)
    except ValueError:
        raise ValidationError(f"to: {side!r} is not a side (fix: training or inference)") from None
