"""Nodes grouped by leaf switch within each fabric island, and the best-fit choice of leaves (pure).

Best fit, in order:
1. the fewest leaf switches;
2. the fewest free GPUs on the nodes the job would take: partly used nodes are filled first, so whole
   nodes stay whole (this only matters for jobs that take part of a node);
3. the least free capacity in the chosen leaves (free GPUs, then free nodes): the job fills the fullest
   group that still holds it, and large empty groups stay whole for large jobs;
4. names, so the same inputs always give the same answer.
With one leaf every leaf is weighed on all four. With more, each island's leaves are chosen on 1, 3 and 4
(a small knapsack), and the islands are then compared on all four; for whole-node jobs, the usual
multi-leaf case, rule 2 is the same for every choice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from hpcserve.model.cluster import Node
from hpcserve.placement.fabric import FabricTopology, natural_key

NameKey = tuple[tuple[int, int | str], ...]


@dataclass(frozen=True, slots=True)
class LeafGroup:
    """The nodes of one leaf switch that can take the job, best fit first (fewest free GPUs, then name)."""

    leaf: str
    island: str
    nodes: tuple[Node, ...]

    @property
    def size(self) -> int:
        return len(self.nodes)

    @property
    def free_gpus(self) -> int:
        return sum(node.gpus_free for node in self.nodes)

    def taken_free(self, count: int) -> int:
        """Free GPUs on the ``count`` nodes a job would take here."""
        return sum(node.gpus_free for node in self.nodes[:count])


@dataclass(frozen=True, slots=True)
class LeafChoice:
    """The leaves one island would give a job of ``need`` nodes."""

    island: str
    groups: tuple[LeafGroup, ...]
    need: int

    @property
    def leaves(self) -> tuple[str, ...]:
        return tuple(group.leaf for group in self.groups)

    @property
    def free_nodes(self) -> int:
        return sum(group.size for group in self.groups)

    @property
    def free_gpus(self) -> int:
        return sum(group.free_gpus for group in self.groups)

    def taken(self) -> tuple[Node, ...]:
        """The nodes the job takes: the larger leaves whole, the rest best fit from the smallest."""
        taken: list[Node] = []
        for group in sorted(self.groups, key=lambda group: (-group.size, natural_key(group.leaf))):
            taken.extend(group.nodes[: self.need - len(taken)])
        return tuple(taken)

    def rank(self) -> tuple[int, int, int, int, str, tuple[NameKey, ...]]:
        """Smaller is better: the module docstring's rules, in order."""
        taken_free = sum(node.gpus_free for node in self.taken())
        names = tuple(natural_key(leaf) for leaf in self.leaves)
        return len(self.groups), taken_free, self.free_gpus, self.free_nodes, self.island, names


Islands = Mapping[str, Sequence[LeafGroup]]


def group_nodes(nodes: Iterable[Node], topology: FabricTopology) -> dict[str, list[LeafGroup]]:
    """Island -> its leaves' groups of ``nodes``, leaves in natural name order."""
    by_leaf: dict[str, list[Node]] = {}
    for node in nodes:
        by_leaf.setdefault(topology.leaf_of(node.name), []).append(node)
    islands: dict[str, list[LeafGroup]] = {}
    for leaf in sorted(by_leaf, key=natural_key):
        members = tuple(sorted(by_leaf[leaf], key=_best_fit_order))
        group = LeafGroup(leaf, topology.island_of(leaf), members)
        islands.setdefault(group.island, []).append(group)
    return islands


def _best_fit_order(node: Node) -> tuple[int, NameKey]:
    return node.gpus_free, natural_key(node.name)


def fewest_leaves(groups: Sequence[LeafGroup], need: int) -> int | None:
    """The fewest of these leaves that together hold ``need`` nodes; None when all of them cannot."""
    held = 0
    for count, size in enumerate(sorted((group.size for group in groups), reverse=True), start=1):
        held += size
        if held >= need:
            return count
    return None


def best_fit(groups: Sequence[LeafGroup], need: int) -> tuple[LeafGroup, ...] | None:
    """This island's best leaves for ``need`` nodes (the module docstring's rules), None if they cannot."""
    limit = fewest_leaves(groups, need)
    if limit is None:
        return None
    if limit == 1:
        return (_best_leaf(groups, need),)
    return _best_leaves(groups, need, limit)


def _best_leaf(groups: Sequence[LeafGroup], need: int) -> LeafGroup:
    fits = [(g.taken_free(need), g.free_gpus, g.size, i) for i, g in enumerate(groups) if g.size >= need]
    return groups[min(fits)[-1]]


def _best_leaves(groups: Sequence[LeafGroup], need: int, limit: int) -> tuple[LeafGroup, ...]:
    """Among the sets of ``limit`` leaves that hold ``need`` nodes, the one with the least free capacity
    (free GPUs, then nodes, then the earliest leaves).

    A small knapsack: states are (leaves used, nodes held capped at ``need``), each keeping its best set,
    so the work is leaves x limit x need, never the number of subsets.
    """
    best: dict[tuple[int, int], tuple[int, int, tuple[int, ...]]] = {(0, 0): (0, 0, ())}
    for index, group in enumerate(groups):
        for (used, held), (gpus, nodes, picked) in list(best.items()):
            if used == limit:
                continue
            key = (used + 1, min(held + group.size, need))
            option = (gpus + group.free_gpus, nodes + group.size, (*picked, index))
            if key not in best or option < best[key]:
                best[key] = option
    return tuple(groups[index] for index in best[(limit, need)][2])


def choose(islands: Islands, need: int) -> LeafChoice | None:
    """The best leaves over all islands for ``need`` nodes, or None when no island holds them now."""
    options = [
        LeafChoice(island, picked, need)
        for island, groups in islands.items()
        if (picked := best_fit(groups, need)) is not None
    ]
    return min(options, key=LeafChoice.rank, default=None)
