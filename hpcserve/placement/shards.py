"""Fractional GPUs on Slurm's gres/shard: the shards a fraction takes, and the node that packs them (pure).

Slurm 22.05 cuts each GPU of a node into ``Count=`` shards (gres.conf); a job asking ``--gres=shard:N`` gets N
shards of one GPU, and within a node Slurm fills GPUs in index order (checked on the local cluster: four
``shard:1`` jobs went to GPU 0, the fifth to GPU 1). Across nodes it picks by its own fit, which spreads small
jobs over idle GPUs. ``choose_shard_node`` therefore names the node (``--nodelist``) so that small replicas
land on the fewest GPUs: first a GPU that already serves shards and still has room (the best fit of those),
then a new GPU on a node that already shares one, then the busiest node with a free GPU.

Slurm's node records give the shards in use per node (``gres/shard`` in tres_used) and which GPUs hold
shards (``GresUsed=shard:...(IDX:0-1)``), not the shards per GPU; as Slurm fills GPUs in order, the room left
on the GPUs in use is their shards less those in use.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hpcserve.model.cluster import Node
from hpcserve.placement.fabric import natural_key


def shards_for(fraction: float, shards_per_gpu: int) -> int:
    """Shards that hold ``fraction`` of a GPU cut into ``shards_per_gpu``: rounded up, at least one.
    ``0.25`` of 4 -> 1; ``0.3`` of 4 -> 2 (rounded to 1e-9 first, so 0.3 x 10 is 3, not 4)."""
    if not 0 < fraction <= 1 or shards_per_gpu < 1:
        raise ValueError(
            f"fraction {fraction} of {shards_per_gpu} shards: need 0 < fraction <= 1, shards >= 1"
        )
    return min(max(1, math.ceil(round(fraction * shards_per_gpu, 9))), shards_per_gpu)


def shard_count(gres: str | None) -> int | None:
    """``shard:2`` (or ``shard:l40s:2``) -> 2; any other GRES (``gpu:1g.10gb:1``, none) -> None."""
    parts = (gres or "").split(":")
    if parts[0] != "shard" or len(parts) < 2 or not parts[-1].isdigit():
        return None
    return int(parts[-1])


@dataclass(frozen=True, slots=True)
class ShardChoice:
    """The node a shard job should run on, and why (one line for the submitter's log)."""

    node: str
    reason: str


@dataclass(frozen=True, slots=True)
class _Room:
    node: Node
    used: int  # shards in use or just submitted there
    open_gpus: int  # GPUs serving shards
    open_room: int  # shards free on those GPUs
    free_gpus: int  # GPUs serving neither shards nor a whole-GPU job


def _room(node: Node, submitted: int) -> _Room:
    per = node.shards_per_gpu
    used = node.shards_alloc + submitted
    open_gpus = max(len(node.shard_gpus), math.ceil(used / per)) if per else 0
    whole = max(node.gpus_alloc, len(node.whole_gpus))
    return _Room(node, used, open_gpus, max(open_gpus * per - used, 0),
                 max(node.gpus_total - whole - open_gpus, 0))  # fmt: skip


def choose_shard_node(
    shards: int,
    nodes: Iterable[Node],
    candidates: frozenset[str] | None = None,
    submitted: Mapping[str, int] | None = None,
) -> ShardChoice | None:
    """The node for a job of ``shards`` shards (see the module docstring for the order), among available
    ``candidates`` (None: every node) whose GPUs have at least that many shards each; ``submitted``: shards
    just submitted per node, not yet in the snapshot. None when no node has room now (Slurm then chooses,
    and the job waits)."""
    done = submitted or {}
    eligible = (n for n in nodes if n.available and n.shards_per_gpu >= shards)
    rooms = [_room(n, done.get(n.name, 0)) for n in eligible if candidates is None or n.name in candidates]
    fits = [r for r in rooms if r.open_room >= shards]
    if fits:
        best = min(fits, key=lambda r: (r.open_room - shards, -r.used, natural_key(r.node.name)))
        left = best.open_room - shards
        why = f"a GPU already serving shards, best fit ({left} shards left on its shared GPUs)"
        return ShardChoice(best.node.name, f"shard:{shards} on {best.node.name}: {why}")
    new = [r for r in rooms if r.free_gpus >= 1]
    if not new:
        return None
    best = min(new, key=lambda r: (-r.used, r.free_gpus, natural_key(r.node.name)))
    why = "a node already sharing GPUs" if best.used else "the node with the fewest free GPUs"
    return ShardChoice(best.node.name, f"shard:{shards} on {best.node.name}: a new GPU on {why}")


def part_gres(gpu_fraction: float | None, mig_profile: str | None, shards_per_gpu: int) -> str | None:
    """The ``--gres`` of a job on part of one GPU: ``shard:N`` for a fraction (``shards_for``),
    ``gpu:PROFILE:1`` for a MIG profile (the site's typed MIG GRES: ``gpu:1g.10gb:1``); None: whole GPUs."""
    if mig_profile:
        return f"gpu:{mig_profile}:1"
    if gpu_fraction:
        return f"shard:{shards_for(gpu_fraction, shards_per_gpu)}"
    return None
