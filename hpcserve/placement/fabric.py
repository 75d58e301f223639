"""The network view placement works on: leaf switches, their nodes, and the fabric island of each leaf.

An *island* is the set of leaves that share one fabric name (``fabrics`` in the site config). NCCL runs
over RDMA inside an island; a job never spans two. Nodes under no known leaf, and leaves whose fabric the
site does not name, form the ``unmapped`` island, which is tcp only; each node under no leaf counts as a
leaf of its own, since nothing says which switch it shares with others.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import groupby
from types import MappingProxyType

from hpcserve.config.sections import Fabric
from hpcserve.config.site import SiteConfig
from hpcserve.model.cluster import Topology

UNMAPPED = "unmapped"
UNMAPPED_FABRIC = Fabric(kind="tcp")


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that puts node2 before node10: digit runs compare as numbers."""
    runs = ("".join(chars) for _, chars in groupby(name, str.isdigit))
    return tuple((0, int(run)) if run.isdigit() else (1, run) for run in runs)


@dataclass(frozen=True, slots=True)
class FabricTopology:
    """Leaf switch -> nodes, and leaf -> fabric island, as placement sees them. Build with
    ``build_fabric_topology``; the mappings are read-only."""

    leaves: Mapping[str, tuple[str, ...]]  # leaf switch -> its nodes, in natural order
    leaf_fabric: Mapping[str, str]  # leaf switch -> fabric (island) name
    fabrics: Mapping[str, Fabric]  # fabric name -> what NCCL needs; UNMAPPED included
    node_leaf: Mapping[str, str]  # node -> its leaf switch

    def leaf_of(self, node: str) -> str:
        """The node's leaf switch; a node under no known leaf is a leaf of its own."""
        return self.node_leaf.get(node, node)

    def island_of(self, leaf: str) -> str:
        """The fabric island of a leaf (``unmapped`` when the site names none)."""
        return self.leaf_fabric.get(leaf, UNMAPPED)

    def fabric(self, island: str) -> Fabric:
        return self.fabrics.get(island, UNMAPPED_FABRIC)

    def islands(self) -> dict[str, tuple[str, ...]]:
        """Island -> its leaves (only leaves with nodes), each in natural order."""
        found: dict[str, list[str]] = {}
        for leaf in self.leaves:
            found.setdefault(self.island_of(leaf), []).append(leaf)
        return {island: tuple(sorted(leaves, key=natural_key)) for island, leaves in sorted(found.items())}


def build_fabric_topology(live: Topology, site: SiteConfig) -> FabricTopology:
    """Join Slurm's live leaf switches with the site's fabric map (pure).

    Leaves and their nodes come from the live topology; a node the live topology puts under no leaf keeps
    the site's leaf. A leaf's fabric is the one the site gives that switch, else the one all its nodes share
    in the site config, else ``unmapped`` (tcp).
    """
    site_leaf = {node: name for name, switch in site.switches.items() for node in switch.nodes}
    node_leaf = {**site_leaf, **live.leaf_map()}
    leaves = _by_leaf(node_leaf.items())
    leaf_fabric = {leaf: _fabric_name(leaf, nodes, site) for leaf, nodes in leaves.items()}
    return FabricTopology(
        leaves=MappingProxyType(leaves),
        leaf_fabric=MappingProxyType(leaf_fabric),
        fabrics=MappingProxyType({UNMAPPED: UNMAPPED_FABRIC, **site.fabrics}),
        node_leaf=MappingProxyType(node_leaf),
    )


def _by_leaf(pairs: Iterable[tuple[str, str]]) -> dict[str, tuple[str, ...]]:
    grouped: dict[str, list[str]] = {}
    for node, leaf in pairs:
        grouped.setdefault(leaf, []).append(node)
    return {leaf: tuple(sorted(nodes, key=natural_key)) for leaf, nodes in sorted(grouped.items())}


def _fabric_name(leaf: str, nodes: tuple[str, ...], site: SiteConfig) -> str:
    switch = site.switches.get(leaf)
    if switch is not None and switch.fabric is not None:
        return switch.fabric
    named = {fabric[0] if fabric else UNMAPPED for fabric in map(site.fabric_of, nodes)}
    return named.pop() if len(named) == 1 else UNMAPPED
