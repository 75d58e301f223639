"""``SiteConfig``: what hpcserve knows about one cluster, checked across sections."""

from __future__ import annotations

from typing import Any

from pydantic import Field, PrivateAttr, field_validator, model_validator

from hpcserve.config.base import Frozen, Invalid, Name, nodes_text
from hpcserve.config.sections import (
    CostSettings,
    DatabaseSettings,
    Fabric,
    Lending,
    ManagedPool,
    NodeGroup,
    Partitions,
    ServiceSettings,
    ServingSettings,
    SlurmSettings,
    Storage,
    Switch,
)


class SiteConfig(Frozen):
    """One cluster: its nodes, partitions, managed pool, fabrics, switches, storage and database."""

    name: Name
    cluster: Name  # Slurm's ClusterName
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)
    nodes: tuple[NodeGroup, ...]
    partitions: Partitions
    managed_pool: ManagedPool = Field(default_factory=ManagedPool)
    lending: Lending = Field(default_factory=Lending)
    fabrics: dict[str, Fabric] = Field(default_factory=dict)
    switches: dict[str, Switch] = Field(default_factory=dict)
    storage: Storage
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    cost: CostSettings = Field(default_factory=CostSettings)  # price per GPU-hour, for hpcserve usage
    admins: tuple[str, ...] = ()  # users, or Unix groups as "@group": may act on every deployment

    _group: dict[str, NodeGroup] = PrivateAttr(default_factory=dict)
    _leaf: dict[str, str] = PrivateAttr(default_factory=dict)

    def model_post_init(self, context: Any, /) -> None:
        self._group = {node: group for group in self.nodes for node in group.names}
        self._leaf = {node: name for name, switch in self.switches.items() for node in switch.nodes}

    @model_validator(mode="before")
    @classmethod
    def _lending_defaults(cls, data: Any) -> Any:
        """``lending.mode`` defaults to overlap, sharing the nodes both partitions list (or
        ``shared_nodes``), except on a site that declares a managed pool (moves, as before) or whose
        partitions share no node (moves with no pool: nothing is lent)."""
        if not isinstance(data, dict):
            return data
        lending = dict(data.get("lending") or {})
        both = _both_partitions(data.get("partitions"))
        if "mode" not in lending:
            pool = data.get("managed_pool") or {}
            pooled = isinstance(pool, dict) and any(pool.values())
            lending["mode"] = "overlap" if not pooled and (both or lending.get("shared_nodes")) else "moves"
        if lending["mode"] == "overlap" and not lending.get("shared_nodes"):
            lending["shared_nodes"] = both
        return {**data, "lending": lending}

    @field_validator("nodes")
    @classmethod
    def _some_nodes(cls, nodes: tuple[NodeGroup, ...]) -> tuple[NodeGroup, ...]:
        if not nodes:
            raise Invalid("", "no node groups", "add at least one group with `names` and `gpus`")
        return nodes

    @model_validator(mode="after")
    def _consistent(self) -> SiteConfig:
        known = frozenset(self.all_nodes())
        _check_unique_nodes(self)
        _check_partitions(self, known)
        _check_managed_pool(self, known)
        _check_lending(self, known)
        _check_switches(self, known)
        return self

    def all_nodes(self) -> tuple[str, ...]:
        """Every node the site knows, in config order."""
        return tuple(node for group in self.nodes for node in group.names)

    def gpus_of(self, node: str) -> int:
        """GPUs on ``node``; 0 for a node the site does not know."""
        group = self._group.get(node)
        return group.gpus if group else 0

    def gpu_type_of(self, node: str) -> str | None:
        group = self._group.get(node)
        return group.gpu_type if group else None

    def leaf_of(self, node: str) -> str | None:
        """The leaf switch ``node`` hangs off, if the site lists one."""
        return self._leaf.get(node)

    def fabric_of(self, node: str) -> tuple[str, Fabric] | None:
        """(fabric name, fabric) of ``node``'s leaf switch."""
        leaf = self.leaf_of(node)
        fabric = self.switches[leaf].fabric if leaf else None
        return (fabric, self.fabrics[fabric]) if fabric else None

    def partition_names(self) -> dict[str, str]:
        """Role (training, inference, shared) -> Slurm partition name."""
        return {role: part.name for role, part in self.partitions.by_role().items()}

    def database_url(self) -> str:
        """The database URL, with ``~`` expanded in a sqlite path."""
        return self.database.resolved_url()


def _require_known(field: str, names: tuple[str, ...], known: frozenset[str], fix: str) -> None:
    unknown = [name for name in names if name not in known]
    if unknown:
        raise Invalid(field, f"unknown nodes: {nodes_text(unknown)}", fix)


def _check_unique_nodes(site: SiteConfig) -> None:
    seen: dict[str, int] = {}
    for index, group in enumerate(site.nodes):
        again = [node for node in group.names if node in seen]
        if again:
            problem = f"{nodes_text(again)} already listed in nodes.{seen[again[0]]}"
            raise Invalid(f"nodes.{index}.names", problem, "list each node in one group only")
        seen.update(dict.fromkeys(group.names, index))


def _both_partitions(partitions: Any) -> list[str]:
    """The nodes both the training and the inference partition list (raw config; [] if unreadable)."""
    from hpcserve.config.base import expand_hostlist

    try:
        training = set(expand_hostlist(partitions["training"]["nodes"]))
        return [n for n in expand_hostlist(partitions["inference"]["nodes"]) if n in training]
    except (Invalid, KeyError, TypeError):
        return []


def _check_partitions(site: SiteConfig, known: frozenset[str]) -> None:
    fix = "add them to `nodes` or remove them from this partition"
    for role, part in site.partitions.by_role().items():
        _require_known(f"partitions.{role}.nodes", part.nodes, known, fix)
    training = set(site.partitions.training.nodes)
    shared = set(site.lending.shared_nodes)
    both = [node for node in site.partitions.inference.nodes if node in training and node not in shared]
    if both:
        raise Invalid(
            "partitions.inference.nodes",
            f"{nodes_text(both)} also in the training partition",
            "give each node to training or inference; to lend them through preemption, list them under "
            "lending.shared_nodes (mode: overlap)",
        )


def _check_lending(site: SiteConfig, known: frozenset[str]) -> None:
    lending = site.lending
    if lending.mode != "overlap":
        return
    _require_known("lending.shared_nodes", lending.shared_nodes, known, "add them to `nodes` or remove them")
    for role in ("training", "inference"):
        partition = site.partitions.by_role()[role]
        outside = [node for node in lending.shared_nodes if node not in partition.nodes]
        if outside:
            problem = f"{nodes_text(outside)} not in the {role} partition ({partition.name})"
            raise Invalid("lending.shared_nodes", problem, f"add them to partitions.{role}.nodes")
    if site.managed_pool.training or site.managed_pool.inference:
        raise Invalid(
            "managed_pool", "lending.mode overlap moves no nodes",
            "remove managed_pool, or set lending.mode: moves",
        )  # fmt: skip


def _check_managed_pool(site: SiteConfig, known: frozenset[str]) -> None:
    for side, names in site.managed_pool.sides().items():
        field = f"managed_pool.{side}"
        _require_known(field, names, known, "add them to `nodes` or remove them from the pool")
        partition = site.partitions.by_role()[side]
        members = set(partition.nodes)
        outside = [node for node in names if node not in members]
        if outside:
            problem = f"{nodes_text(outside)} not in the {side} partition ({partition.name})"
            raise Invalid(field, problem, f"list here only nodes of partitions.{side}")


def _check_switches(site: SiteConfig, known: frozenset[str]) -> None:
    leaf_of: dict[str, str] = {}
    for name, switch in site.switches.items():
        _check_switch(site, name, switch, known)
        again = [node for node in switch.nodes if node in leaf_of]
        if again:
            problem = f"{nodes_text(again)} already under leaf {leaf_of[again[0]]}"
            raise Invalid(f"switches.{name}.nodes", problem, "put each node under one leaf switch")
        leaf_of.update(dict.fromkeys(switch.nodes, name))


def _check_switch(site: SiteConfig, name: str, switch: Switch, known: frozenset[str]) -> None:
    where = f"switches.{name}"
    _require_known(
        f"{where}.nodes", switch.nodes, known, "add them to `nodes` or remove them from this switch"
    )
    unknown = [child for child in switch.switches if child not in site.switches]
    if unknown:
        defined = ", ".join(site.switches)
        problem = f"unknown child switches: {', '.join(unknown)}"
        raise Invalid(f"{where}.switches", problem, f"name switches defined under `switches`: {defined}")
    if switch.fabric is not None and switch.fabric not in site.fabrics:
        defined = ", ".join(site.fabrics) or "none yet"
        problem = f"unknown fabric {switch.fabric!r}"
        raise Invalid(f"{where}.fabric", problem, f"use a fabric defined under `fabrics`: {defined}")
