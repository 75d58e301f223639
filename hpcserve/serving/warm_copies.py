"""Where a deployment's weights lie staged on node-local disk, and when to remove them (pure: no I/O).

The off tier means "nothing staged". A replica stages its weights into its warm tier on its node
(``hpcserve.serving.replica``: ``warm_tier`` with ``{node}`` = the node's name, then the model folder's
name) before its engine starts. The service remembers each (node, warm copy) a ready replica of the
deployment staged (``Staged``, kept in the service state ``staged:<deployment>``), since the replica rows
are gone once it is cold. Once the deployment is off, with no replica left, each node's copies are removed
by a job of the owner on that node (``hpcserve.serving.unstage``); a node whose job was submitted is
forgotten. A copy that another deployment, not off, also staged on that node (the same model in the same
warm tier) is left to that one and forgotten here.

A member that leaves a live pool (``hpcserve rm`` of the member) has its copies removed the same way, once
every replica of the pool runs the members of now (the ones that served it have been handed over):
``plan_left``, the copies the pool recorded that none of its members stages now.

A deployment removed with ``hpcserve rm`` (its row gone with its last replica) has its copies removed the
same way: the record keeps who to submit as (``CopyOwner``), so the removal outlives the deployment's row
until its jobs are submitted.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from hpcserve.serving.tiers import Tier

NONE = "none"  # the staging kind of a replica that staged nothing (``hpcserve.serving.phases``)


def warm_copy(warm_tier: str | None, model: str, node: str, user: str | None = None) -> str | None:
    """The folder a replica of ``user`` on ``node`` stages ``model`` into (``start_probe.stage``), or None
    when nothing is staged: no warm tier, or a model that is no absolute folder path (a hub id). The warm
    tier's ``{node}`` is the node's name and ``{user}`` the user's (None: a tier without ``{user}``)."""
    if not warm_tier or not model.startswith("/") or not node or ("{user}" in warm_tier and not user):
        return None
    name = posixpath.basename(posixpath.normpath(model))
    if name in ("", ".", "..", "/"):
        return None
    return posixpath.join(warm_tier.replace("{node}", node).replace("{user}", user or ""), name)


def own_folder(warm_tier: str, node: str, user: str) -> str | None:
    """The user's own folder in a warm tier with ``{user}``: the path down to the first part naming the
    user (``/local/{node}/{user}/models`` -> ``/local/node5/alice``); None without ``{user}``."""
    parts = warm_tier.split("/")
    for i, part in enumerate(parts):
        if "{user}" in part:
            return "/".join(parts[: i + 1]).replace("{node}", node).replace("{user}", user)
    return None


@dataclass(frozen=True, slots=True)
class CopyOwner:
    """Whom the cleanup jobs of a deployment's copies run as, and where: kept with the copies, since a
    removed deployment's row is gone before its copies are."""

    user: str
    account: str | None = None
    partition: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return {"user": self.user, "account": self.account, "partition": self.partition}

    @classmethod
    def from_json(cls, data: object) -> CopyOwner | None:
        """The stored owner; None when it does not read as one (a record written before owners were kept)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("user"), str) or not data["user"]:
            return None
        account, partition = data.get("account"), data.get("partition")
        return cls(data["user"], account if isinstance(account, str) else None,
                   partition if isinstance(partition, str) else None)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Staged:
    """Each node's warm copies of one deployment (node -> sorted folders), and their owner."""

    nodes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    owner: CopyOwner | None = None

    def with_seen(self, seen: Iterable[tuple[str, str]]) -> Staged:
        """These copies with ``seen`` (node, folder) pairs added."""
        merged = {node: set(paths) for node, paths in self.nodes.items()}
        for node, path in seen:
            merged.setdefault(node, set()).add(path)
        nodes = {node: tuple(sorted(paths)) for node, paths in sorted(merged.items())}
        return Staged(nodes, self.owner)

    def without(self, node: str, paths: Iterable[str] = ()) -> Staged:
        """These copies less ``paths`` on ``node`` (all of the node's when none are named)."""
        gone, left = set(paths), dict(self.nodes)
        kept = tuple(p for p in left.pop(node, ()) if gone and p not in gone)
        return Staged({**left, node: kept} if kept else left, self.owner)

    def owned_by(self, owner: CopyOwner) -> Staged:
        return Staged(self.nodes, owner)

    def pairs(self) -> set[tuple[str, str]]:
        return {(node, path) for node, paths in self.nodes.items() for path in paths}

    def to_json(self) -> dict[str, object]:
        nodes = {node: list(paths) for node, paths in self.nodes.items()}
        return {"nodes": nodes, "owner": None if self.owner is None else self.owner.to_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, object] | None) -> Staged:
        """The stored record (``{"nodes": ..., "owner": ...}``, or the older node -> paths without an
        owner); what does not read as node -> list of paths is left out."""
        data = data or {}
        listed = data.get("nodes")
        owner = CopyOwner.from_json(data.get("owner")) if isinstance(listed, Mapping) else None
        nodes = {}
        for node, paths in (listed if isinstance(listed, Mapping) else data).items():
            if isinstance(paths, list) and all(isinstance(p, str) for p in paths) and paths:
                nodes[str(node)] = tuple(sorted(set(paths)))
        return cls(nodes, owner)


@dataclass(frozen=True, slots=True)
class Removal:
    """What to do this tick: the copies to remove, by node (one owner's job each), and the ones another
    deployment still needs (forgotten here, left on disk)."""

    remove: Mapping[str, tuple[str, ...]]
    shared: frozenset[tuple[str, str]] = frozenset()


def plan_removal(staged: Staged, tier: Tier, live_replicas: int,
                 needed_elsewhere: frozenset[tuple[str, str]]) -> Removal:  # fmt: skip
    """The copies to remove now: only once the deployment is off and has no replica left (a replica
    starting would stage again), and never a copy another deployment (not off) staged on that node."""
    if tier is not Tier.OFF or live_replicas or not staged.nodes:
        return Removal({})
    shared = frozenset(staged.pairs() & needed_elsewhere)
    remove = {
        node: tuple(p for p in paths if (node, p) not in shared) for node, paths in staged.nodes.items()
    }
    return Removal({node: paths for node, paths in remove.items() if paths}, shared)


def plan_left(staged: Staged, kept: frozenset[tuple[str, str]],
              needed_elsewhere: frozenset[tuple[str, str]]) -> Removal:  # fmt: skip
    """A live pool's copies to remove now: those its members of now do not stage (``kept``: what they
    stage on the recorded nodes), so copies of members that left; never a copy another deployment (not
    off) staged on that node. Called only once no replica serves a member that left."""
    left = staged.pairs() - kept
    shared = frozenset(left & needed_elsewhere)
    remove: dict[str, list[str]] = {}
    for node, path in sorted(left - shared):
        remove.setdefault(node, []).append(path)
    return Removal({node: tuple(paths) for node, paths in remove.items()}, shared)
