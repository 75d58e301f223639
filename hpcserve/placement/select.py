"""Choose the nodes of a multi-node job: few leaf switches, one fabric island, best fit (pure).

``select_nodes`` returns a ``Placement``:
- fits now: the nodes (sbatch ``--nodelist``) on the fewest leaf switches of one island, best fit;
- fits one island only once running jobs end: no nodes, but ``--switches=<leaves>@<wait>`` and
  ``--constraint=<the island's feature>`` so Slurm waits for few leaves within that island
  (slurmctld caps the wait at SchedulerParameters=max_switch_wait, 300 s unless the site raises it);
- can never fit (bigger than any island, or no candidate can take it): ``PlacementError``.
``first_fit`` is the naive baseline the benchmark compares with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from hpcserve.errors import HpcserveError
from hpcserve.model.cluster import ClusterSnapshot, Node
from hpcserve.placement.fabric import FabricTopology, natural_key
from hpcserve.placement.groups import (
    Islands,
    LeafChoice,
    LeafGroup,
    choose,
    fewest_leaves,
    group_nodes,
)
from hpcserve.placement.nccl import nccl_env


class PlacementError(HpcserveError):
    """The job can never be placed as asked: the message says what was asked, what exists, and the fix."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    """What placement needs to know about a job."""

    nodes: int
    gpus_per_node: int = 0
    candidates: frozenset[str] | None = None  # e.g. the partition's nodes; None: every node
    degraded: frozenset[str] = frozenset()  # nodes to avoid (failing links, slow GPUs)
    switch_wait_s: int = 600  # how long Slurm may hold the job for few leaves when it does not fit now

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0 or self.switch_wait_s < 0:
            raise PlacementError(
                f"cannot place nodes={self.nodes}, gpus_per_node={self.gpus_per_node}, "
                f"switch_wait_s={self.switch_wait_s}: ask for 1 node or more and no negative values"
            )

    def describe(self) -> str:
        """``2 nodes x 4 GPUs``, or ``2 nodes`` for a CPU-only job."""
        nodes = _plural(self.nodes, "node")
        return f"{nodes} x {_plural(self.gpus_per_node, 'GPU')}" if self.gpus_per_node else nodes


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a job goes, in the terms of sbatch, and why."""

    nodes: tuple[str, ...]  # --nodelist; empty when the job must wait for nodes
    leaves: tuple[str, ...]  # the leaf switches of ``nodes``
    fabric: str  # the fabric island
    switches: str | None = None  # --switches, e.g. "1@00:10:00"
    constraint: str | None = None  # --constraint: the island's node feature
    env: Mapping[str, str] = field(default_factory=dict)  # NCCL (and gloo) settings for the fabric
    reason: str = ""

    @property
    def fits_now(self) -> bool:
        return bool(self.nodes)


def select_nodes(request: PlacementRequest, snapshot: ClusterSnapshot, topology: FabricTopology) -> Placement:
    """Fewest leaf switches in one fabric island, best fit; the module docstring lists the outcomes."""
    usable = group_nodes((node for node in snapshot.nodes if usable_for(node, request)), topology)
    choice = choose(usable, request.nodes)
    if choice is not None:
        return _placed(request, choice, topology)
    return _waiting(request, snapshot, topology, usable)


def usable_for(node: Node, request: PlacementRequest) -> bool:
    """The node can take one of the job's tasks now: eligible, up and not draining, enough free GPUs."""
    return _eligible(node, request) and node.available and node.gpus_free >= request.gpus_per_node


def _eligible(node: Node, request: PlacementRequest) -> bool:
    """The node could ever take one of the job's tasks: a candidate, not degraded, enough GPUs in all."""
    candidate = request.candidates is None or node.name in request.candidates
    return candidate and node.name not in request.degraded and node.gpus_total >= request.gpus_per_node


def _placed(request: PlacementRequest, choice: LeafChoice, topology: FabricTopology) -> Placement:
    left = choice.free_nodes - request.nodes
    where = f"{'+'.join(choice.leaves)} ({choice.island})"
    fewest = ", the fewest leaf switches that fit now" if len(choice.leaves) > 1 else ""
    left_text = _plural(left, "free node")
    reason = f"{_plural(request.nodes, 'node')} on {where}{fewest}; best fit: {left_text} left there"
    return Placement(
        nodes=tuple(sorted((node.name for node in choice.taken()), key=natural_key)),
        leaves=choice.leaves,
        fabric=choice.island,
        env=MappingProxyType(nccl_env(topology.fabric(choice.island), choice.island)),
        reason=reason,
    )


def _waiting(
    request: PlacementRequest, snapshot: ClusterSnapshot, topology: FabricTopology, usable: Islands
) -> Placement:
    """The island to wait in: one Slurm can be pinned to, then the fewest leaves, then the most usable now."""
    islands = group_nodes((node for node in snapshot.nodes if _eligible(node, request)), topology)
    options = [
        (topology.fabric(island).feature is None, leaves, -_size(usable.get(island, ())), island)
        for island, groups in islands.items()
        if (leaves := fewest_leaves(groups, request.nodes)) is not None
    ]
    if not options:
        raise PlacementError(_never_fits(request, snapshot, islands))
    _, leaves, _, island = min(options)
    fabric = topology.fabric(island)
    wait = clock(request.switch_wait_s)
    pinned = f"pinned with --constraint={fabric.feature}" if fabric.feature else (
        f"not pinned to it: set fabrics.{island}.feature in the site config"
    )  # fmt: skip
    reason = (
        f"{request.describe()} do not fit now; Slurm waits up to {wait} for "
        f"{_plural(leaves, 'leaf switch', 'leaf switches')} of {island}, {pinned}"
    )
    return Placement(
        nodes=(),
        leaves=(),
        fabric=island,
        switches=f"{leaves}@{wait}",
        constraint=fabric.feature,
        env=MappingProxyType(nccl_env(fabric, island)),
        reason=reason,
    )


def _never_fits(request: PlacementRequest, snapshot: ClusterSnapshot, islands: Islands) -> str:
    """One line: what was asked, what exists, and the fix."""
    if not islands:
        return _no_candidate(request, snapshot)
    sizes = {island: _size(groups) for island, groups in islands.items()}
    found = ", ".join(f"{island} has {size}" for island, size in sorted(sizes.items()))
    return (
        f"cannot place {request.describe()} in one fabric island (a job never spans two): {found} such "
        f"nodes; ask for at most {_plural(max(sizes.values()), 'node')}"
    )


def _no_candidate(request: PlacementRequest, snapshot: ClusterSnapshot) -> str:
    pool = [n for n in snapshot.nodes if request.candidates is None or n.name in request.candidates]
    most = max((n.gpus_total for n in pool if n.name not in request.degraded), default=0)
    return (
        f"cannot place {request.describe()}: no candidate node outside the degraded list has "
        f"{request.gpus_per_node} GPUs ({_plural(len(pool), 'candidate')}, {len(request.degraded)} degraded, "
        f"at most {most} GPUs each); ask for fewer GPUs per node or use another partition"
    )


def _size(groups: Sequence[LeafGroup]) -> int:
    return sum(group.size for group in groups)


def first_fit(request: PlacementRequest, snapshot: ClusterSnapshot, topology: FabricTopology) -> Placement:
    """Baseline: the first usable nodes in name order, blind to leaf switches and fabric islands.
    No nodes when too few are usable now."""
    names = sorted((n.name for n in snapshot.nodes if usable_for(n, request)), key=natural_key)
    picked = tuple(names[: request.nodes])
    if len(picked) < request.nodes:
        return Placement(nodes=(), leaves=(), fabric="", reason=f"{request.describe()} do not fit now")
    leaves = tuple(sorted({topology.leaf_of(name) for name in picked}, key=natural_key))
    islands = sorted({topology.island_of(leaf) for leaf in leaves})
    return Placement(
        nodes=picked,
        leaves=leaves,
        fabric="+".join(islands),
        env=MappingProxyType(nccl_env(topology.fabric(islands[0]), islands[0])),
        reason=f"first {_plural(len(picked), 'usable node')} by name",
    )


def clock(seconds: int) -> str:
    """Seconds -> ``HH:MM:SS`` (hours may pass 24), the form --switches takes after ``@``."""
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}"


def _plural(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"
