"""Does the live Slurm lend the way the site config's ``lending`` section says? Pure: it compares a
``SiteConfig`` with a ``LiveSlurm`` read by ``hpcserve doctor`` and names every mismatch with its fix."""

from __future__ import annotations

from dataclasses import dataclass

from hpcserve.config.base import nodes_text
from hpcserve.config.site import SiteConfig
from hpcserve.slurm.preempt_conf import LiveSlurm, PartitionPreempt, QosPreempt

RECONFIGURE = "in slurm.conf, then scontrol reconfigure"
RESTART = "in slurm.conf, then restart slurmctld"
TIER_STEP = 10


@dataclass(frozen=True, slots=True)
class Mismatch:
    problem: str
    fix: str


def lending_mismatches(site: SiteConfig, live: LiveSlurm) -> list[Mismatch]:
    """Every way the live Slurm differs from the site's lending declaration (empty: they agree)."""
    names = site.partition_names()
    train, infer = live.partitions.get(names["training"]), live.partitions.get(names["inference"])
    pairs = ((names["training"], train), (names["inference"], infer))
    missing = [_missing_partition(name) for name, part in pairs if part is None]
    if train is None or infer is None:
        return missing
    if site.lending.mode == "moves":
        return _moves(site, train, infer)
    return [*_preemption(site, live, train), *_shared(site, train), *_shared(site, infer),
            *(_tiers(train, infer) if site.lending.preempt == "partition_prio" else [])]  # fmt: skip


def summary(site: SiteConfig) -> str:
    """One line: what the site declares, for the doctor's ok line."""
    lending, names = site.lending, site.partition_names()
    if lending.mode == "moves":
        pool = site.managed_pool.training + site.managed_pool.inference
        sides = f"{names['training']}/{names['inference']}"
        return f"mode moves: managed pool {nodes_text(pool) or '(empty)'} in {sides} as declared"
    how = "PriorityTier" if lending.preempt == "partition_prio" else f"QOS {lending.inference_qos}"
    shared = nodes_text(lending.shared_nodes)
    return (f"mode overlap: {names['inference']} preempts {names['training']} on {shared} ({how}), "
            f"REQUEUE, GraceTime {lending.grace_time_s} s")  # fmt: skip


def _missing_partition(name: str) -> Mismatch:
    return Mismatch(f"partition {name} is not in Slurm", f"add PartitionName={name} {RECONFIGURE}")


def _preemption(site: SiteConfig, live: LiveSlurm, train: PartitionPreempt) -> list[Mismatch]:
    want = f"preempt/{site.lending.preempt}"
    out = []
    if live.preempt_type != want:
        problem = f"PreemptType is {live.preempt_type or 'unset'}, not {want}"
        out.append(Mismatch(problem, f"PreemptType={want} {RESTART}"))
    if "REQUEUE" not in live.preempt_mode.upper().split(","):
        problem = f"PreemptMode is {live.preempt_mode or 'unset'}, not REQUEUE"
        out.append(Mismatch(problem, f"PreemptMode=REQUEUE {RESTART}"))
    if site.lending.preempt == "qos":
        return [*out, *_qos(site, live)]
    return [*out, *_training_partition(site, train)]


def _training_partition(site: SiteConfig, train: PartitionPreempt) -> list[Mismatch]:
    out, grace, where = [], site.lending.grace_time_s, f"on PartitionName={train.name}"
    if train.preempt_mode.upper() not in ("REQUEUE", ""):
        problem = f"partition {train.name} has PreemptMode={train.preempt_mode}, not REQUEUE"
        out.append(Mismatch(problem, f"PreemptMode=REQUEUE {where} {RECONFIGURE}"))
    if train.grace_time_s != grace:
        problem = (
            f"partition {train.name} has GraceTime={train.grace_time_s}, not lending.grace_time_s ({grace})"
        )
        out.append(Mismatch(problem, f"GraceTime={grace} {where} {RECONFIGURE}"))
    return out


def _tiers(train: PartitionPreempt, infer: PartitionPreempt) -> list[Mismatch]:
    if infer.priority_tier > train.priority_tier:
        return []
    problem = (f"partition {infer.name} has PriorityTier={infer.priority_tier}, "
               f"not above {train.name}'s {train.priority_tier}")  # fmt: skip
    fix = f"PriorityTier={train.priority_tier + TIER_STEP} on PartitionName={infer.name} {RECONFIGURE}"
    return [Mismatch(problem, fix)]


def _shared(site: SiteConfig, part: PartitionPreempt) -> list[Mismatch]:
    lacking = [node for node in site.lending.shared_nodes if node not in part.nodes]
    if not lacking:
        return []
    problem = f"partition {part.name} lacks {nodes_text(lacking)} of lending.shared_nodes"
    nodes = nodes_text([*{*part.nodes, *lacking}])
    return [Mismatch(problem, f"Nodes={nodes} on PartitionName={part.name} {RECONFIGURE}")]


def _qos(site: SiteConfig, live: LiveSlurm) -> list[Mismatch]:
    lending, known = site.lending, live.qos or {}
    train_name, infer_name = lending.training_qos or "", lending.inference_qos or ""
    absent = [name for name in (train_name, infer_name) if name not in known]
    if absent:
        return [Mismatch(f"QOS {name} is not in slurmdbd", f"sacctmgr add qos {name}") for name in absent]
    train, infer, out = known[train_name], known[infer_name], []
    if train_name not in infer.preempt:
        problem = f"QOS {infer_name} has Preempt={','.join(infer.preempt) or '(none)'}, without {train_name}"
        out.append(Mismatch(problem, f"sacctmgr modify qos {infer_name} set Preempt+={train_name}"))
    return [*out, *_training_qos(train, live.preempt_mode, lending.grace_time_s)]


def _training_qos(train: QosPreempt, cluster_mode: str, grace: int) -> list[Mismatch]:
    out, mode = [], cluster_mode if train.preempt_mode in ("", "cluster") else train.preempt_mode
    if "REQUEUE" not in mode.upper().split(","):
        problem = f"QOS {train.name} has PreemptMode={train.preempt_mode}, not REQUEUE"
        out.append(Mismatch(problem, f"sacctmgr modify qos {train.name} set PreemptMode=requeue"))
    if train.grace_time_s != grace:
        problem = f"QOS {train.name} has GraceTime={train.grace_time_s}, not lending.grace_time_s ({grace})"
        out.append(Mismatch(problem, f"sacctmgr modify qos {train.name} set GraceTime={grace}"))
    return out


def _moves(site: SiteConfig, train: PartitionPreempt, infer: PartitionPreempt) -> list[Mismatch]:
    """Moves: each pool node is on exactly one side; every node that never moves is where the site says."""
    pool = site.managed_pool.training + site.managed_pool.inference
    out = [m for node in pool if (m := _pool_node(node, train, infer))]
    for role, part in (("training", train), ("inference", infer)):
        fixed = [n for n in site.partitions.by_role()[role].nodes if n not in pool and n not in part.nodes]
        if fixed:
            nodes = nodes_text([*{*part.nodes, *fixed}])
            problem = f"partition {part.name} lacks {nodes_text(fixed)} of partitions.{role}.nodes"
            out.append(Mismatch(problem, f"Nodes={nodes} on PartitionName={part.name} {RECONFIGURE}"))
    return out


def _pool_node(node: str, train: PartitionPreempt, infer: PartitionPreempt) -> Mismatch | None:
    sides = [part.name for part in (train, infer) if node in part.nodes]
    if len(sides) == 1:
        return None
    where = "both " + " and ".join(sides) if sides else f"neither {train.name} nor {infer.name}"
    fix = (f"keep it in one: scontrol update PartitionName={train.name} Nodes=... (hpcserve's rebalancer "
           "re-applies its layout on its next round)")  # fmt: skip
    return Mismatch(f"managed_pool node {node} is in {where}", fix)
