"""The split: which side each managed-pool node belongs to, and the partition node lists that give it.

Pure. The desired split is the site's starting sides overlaid by every node move that was carried out, in
order (the last move of a node wins); the executor derives it from the plans it stored, so it survives a
restart, and re-asserts it whenever Slurm's partitions drift (``scontrol reconfigure`` re-reads slurm.conf).
Only the training and inference partitions change; the shared partition keeps every node.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from hpcserve.model.rebalance import Side

if TYPE_CHECKING:
    from hpcserve.config import SiteConfig


@dataclass(frozen=True, slots=True)
class Layout:
    """The site's two sides as Slurm partitions, and the managed pool with each node's starting side."""

    training: str
    inference: str
    shared: str | None = None
    start: Mapping[str, Side] = field(default_factory=dict)

    @classmethod
    def from_site(cls, site: SiteConfig) -> Layout:
        pool = site.managed_pool
        start = {
            **dict.fromkeys(pool.training, Side.TRAINING),
            **dict.fromkeys(pool.inference, Side.INFERENCE),
        }
        shared = site.partitions.shared.name if site.partitions.shared else None
        return cls(site.partitions.training.name, site.partitions.inference.name, shared, start)

    def partition(self, side: Side) -> str:
        return self.training if side is Side.TRAINING else self.inference

    def side_of_partition(self, partition: str) -> Side | None:
        return {self.training: Side.TRAINING, self.inference: Side.INFERENCE}.get(partition)

    def managed(self, node: str) -> bool:
        return node in self.start


def desired_split(layout: Layout, moves: Iterable[tuple[str, Side]]) -> dict[str, Side]:
    """Each managed node's side: where it started, then where its latest carried-out move took it."""
    split = dict(layout.start)
    for node, side in moves:
        if node in split:
            split[node] = side
    return split


def current_side(layout: Layout, node: str, partitions: Mapping[str, Sequence[str]]) -> Side | None:
    """The side ``node`` is on in Slurm now; None when it is on neither or (half-moved) on both."""
    sides = [side for side in Side if node in partitions.get(layout.partition(side), ())]
    return sides[0] if len(sides) == 1 else None


def split_updates(
    layout: Layout,
    partitions: Mapping[str, Sequence[str]],
    desired: Mapping[str, Side],
    skip: Iterable[str] = (),
) -> dict[str, tuple[str, ...]]:
    """The new node list of each side's partition whose managed nodes differ from ``desired`` (nodes in
    ``skip`` and nodes outside the pool keep their membership). A partition that gains nodes comes first,
    so a moving node is never in neither."""
    skipped = frozenset(skip)
    wanted = {n: s for n, s in desired.items() if layout.managed(n) and n not in skipped}
    updates: dict[str, tuple[str, ...]] = {}
    for side in Side:
        name = layout.partition(side)
        now = tuple(partitions.get(name, ()))
        keep = [n for n in now if wanted.get(n, side) is side]
        add = [n for n, s in wanted.items() if s is side and n not in now]
        if add or len(keep) != len(now):
            updates[name] = tuple(sorted([*keep, *add], key=_natural))
    return dict(sorted(updates.items(), key=lambda item: len(item[1]) <= len(partitions.get(item[0], ()))))


def _natural(name: str) -> tuple[str, int, str]:
    """node2 before node10."""
    stem = name.rstrip("0123456789")
    digits = name[len(stem) :]
    return (stem, int(digits) if digits else -1, name)


def split_timeline(
    start: datetime, base: Mapping[str, Side], events: Iterable[tuple[datetime, str, Side]]
) -> list[tuple[datetime, int, int]]:
    """(time, training nodes, inference nodes) at ``start`` (every node on its ``base`` side), then after
    each move from ``start`` on; moves before ``start`` change the starting point."""
    sides = dict(base)
    ordered = sorted(events)
    for _, node, side in (e for e in ordered if e[0] < start):
        sides[node] = side
    points = [(start, *_counts(sides))]
    for at, node, side in (e for e in ordered if e[0] >= start):
        sides[node] = side
        points.append((at, *_counts(sides)))
    return points


def _counts(sides: Mapping[str, Side]) -> tuple[int, int]:
    training = sum(1 for s in sides.values() if s is Side.TRAINING)
    return training, len(sides) - training
