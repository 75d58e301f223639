"""Deployments behind the service API: create, list, show, scale, share, remove and read logs.

Every function takes the service's ``ApiContext`` (its own site, policy, store and Slurm client: never the
caller's files) and the ``Caller`` the kernel or munge vouched for. Changing a deployment, or reading its
logs, is for its owner or an admin (``admins`` in the service's site config, users or ``@group``); the list
is everyone's. Limits are the owner's (``hpcserve.api.limits``), whoever asks. Nothing here ticks the
serving controller: a request stores desired state, the service's own controller acts on it.
"""

from __future__ import annotations

import grp
import posixpath
import pwd
import re
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from hpcserve.api.caller import is_admin
from hpcserve.api.errors import Forbidden
from hpcserve.api.limits import check_replicas, owner_usage, replica_gpus, wanted_replicas
from hpcserve.errors import ValidationError
from hpcserve.store.errors import NotFound

if TYPE_CHECKING:
    from hpcserve.api.caller import Caller
    from hpcserve.api.context import ApiContext
    from hpcserve.config import SiteConfig
    from hpcserve.serving.spec import DeploymentSpec
    from hpcserve.store import Deployment, Replica

SHARE_ALL = "all"
_UNIX_NAME = re.compile(r"^[a-z_][a-z0-9_.-]*\$?$")  # useradd's rule (NAME_REGEX), case-folded
_ACCOUNT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
QUEUE_WINDOW = timedelta(seconds=30)  # engine samples older than this do not count as the queue now


# ------------------------------------------------------------------------------------------- create


def create(
    api: ApiContext, caller: Caller, values: Mapping[str, Any], base: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Store a new deployment owned by the caller. ``values``: the CLI's fields (``None`` = not given),
    plus ``account`` and ``shares``; ``base``: a spec file's fields, which ``values`` override."""
    from hpcserve.jobs.policy import resolve
    from hpcserve.serving.launcher import replica_request

    fields = dict(values)
    account = check_account(fields.pop("account", None))
    shares = check_shares(fields.pop("shares", None) or [])
    spec = build_spec(fields, base)
    check_model(spec.model)
    check_warm_tier(api.site, spec.warm_tier)
    resolve(replica_request(spec, 0, user=caller.user), api.policy)  # partition, per-job GPUs, time
    if spec.min_replicas:  # a member: its pool's replicas, counted once on the pool's row
        wanted = max(spec.min_replicas, pool_wanted(api, spec.pool, caller.user))
        check_owner_limits(api, caller.user, spec.pool or spec.name, spec_gpus(api, spec), wanted)
    if spec.pool is not None:
        join_pool(api, caller, spec, account, shares)
        return show(api, caller, spec.name)
    api.store.create_deployment(spec.name, caller.user, spec.model_dump(mode="json"), spec.min_replicas,
                                served_model_name=spec.served_model_name, account=account,
                                shares=shares)  # fmt: skip
    return show(api, caller, spec.name)


def join_pool(
    api: ApiContext, caller: Caller, spec: DeploymentSpec, account: str | None, shares: list[str]
) -> None:
    """Store the member and create or update its pool's row (one transaction). A pool is one owner's:
    another user's pool is refused (``Forbidden``), as is a member whose replica shape differs."""
    from hpcserve.serving.pools import is_pool, pool_spec, shape_problem

    pool = str(spec.pool)
    if pool == spec.name:
        raise ValidationError(f"pool: {pool!r} is the deployment's own name (fix: name the pool differently)")
    found = api.store.get_deployment(pool)
    if found is not None and found.owner != caller.user:
        raise Forbidden(
            f"pool {pool!r} belongs to {found.owner}, not {caller.user}: a pool's members are its owner's "
            "(fix: pick another --pool name)"
        )
    member = spec.model_dump(mode="json")
    problem = shape_problem(found.spec, member) if found is not None and is_pool(found.spec) else None
    if problem is not None:
        raise ValidationError(problem)
    api.store.join_pool(spec.name, caller.user, member, pool, pool_spec,
                        served_model_name=spec.served_model_name, account=account, shares=shares)  # fmt: skip


def build_spec(values: Mapping[str, Any], base: Mapping[str, Any] | None) -> DeploymentSpec:
    """The spec from a spec file's fields (``base``) and the flags over them; one line per problem."""
    import pydantic

    from hpcserve.config.loader import to_config_error
    from hpcserve.serving.spec import DeploymentSpec, build_deployment

    if base is None:
        return build_deployment(values)
    try:
        loaded = DeploymentSpec.model_validate(dict(base))
    except pydantic.ValidationError as exc:
        raise to_config_error("spec file", DeploymentSpec, exc) from exc
    return build_deployment(values, loaded)


def check_model(model: str) -> None:
    """A model starting with ``-`` would reach the engine's command line as a flag."""
    if model.startswith("-"):
        raise ValidationError(
            f"model: {model!r} starts with '-' and would be read as an engine flag "
            "(fix: give a path or a hub id such as org/model; write ./-name for a local folder)"
        )


def check_warm_tier(site: SiteConfig, warm_tier: str | None) -> None:
    """``warm_tier`` must lie under the site's warm tier (both ``{node}`` templates), with no ``..``."""
    if warm_tier is None:
        return
    if site.storage.warm is None:
        raise ValidationError("warm_tier: this site has no warm tier (fix: drop --warm-tier / warm_tier)")
    root = posixpath.normpath(site.storage.warm.path)
    if ".." in warm_tier.split("/"):
        raise ValidationError(f"warm_tier: {warm_tier!r} holds '..' (fix: a folder under {root})")
    given = posixpath.normpath(warm_tier)
    if given != root and not given.startswith(root.rstrip("/") + "/"):
        raise ValidationError(
            f"warm_tier: {warm_tier!r} is not under the site's warm tier {root} "
            f"(fix: use {root} or a folder under it, or drop warm_tier)"
        )


def check_account(account: object) -> str | None:
    """A Slurm account name, or None (the owner's default); Slurm's associations decide the rest."""
    if account is None or account == "":
        return None
    if not isinstance(account, str) or not _ACCOUNT.match(account):
        raise ValidationError(
            f"account: {account!r} is not a Slurm account name (fix: letters, digits, '_', '.', '-'; "
            "see `sacctmgr show assoc user=$USER`)"
        )
    return account


def check_shares(items: object) -> list[str]:
    """Users, ``@group`` or ``all`` (each existing on the service's host), without repeats."""
    if not isinstance(items, list | tuple):
        raise ValidationError("shares: expected a list of USER, @GROUP or all")
    shares: list[str] = []
    for item in items:
        if not isinstance(item, str) or not _known_principal(item):
            raise ValidationError(
                f"shares: {item!r} is not a known user, @group or 'all' (fix: e.g. --share-with bob, "
                "--share-with @physics or --share-with all)"
            )
        if item not in shares:
            shares.append(item)
    return shares


def _known_principal(item: str) -> bool:
    if item == SHARE_ALL:
        return True
    name = item.removeprefix("@")
    if not _UNIX_NAME.match(name):
        return False
    try:
        grp.getgrnam(name) if item.startswith("@") else pwd.getpwnam(name)
    except KeyError:
        return False
    return True


# ---------------------------------------------------------------------------- limits and ownership


def spec_gpus(api: ApiContext, spec: DeploymentSpec) -> float:
    """GPUs one replica holds; the part of one GPU (its shards) for a ``gpu_fraction``."""
    from hpcserve.jobs.policy import part_gpus

    whole = spec.gpus_per_replica * spec.nodes_per_replica
    return part_gpus(whole, spec.gpu_fraction, api.site.serving.shards_per_gpu)


def pool_wanted(api: ApiContext, pool: str | None, owner: str) -> int:
    """The replicas ``owner``'s pool ``pool`` keeps now (0: no such pool of theirs)."""
    from hpcserve.serving.pools import is_pool

    found = api.store.get_deployment(pool) if pool else None
    if found is None or found.owner != owner or not is_pool(found.spec):
        return 0
    return wanted_replicas(found)


def check_owner_limits(api: ApiContext, owner: str, name: str, per_replica: float, replicas: int) -> None:
    """``replicas`` x ``per_replica`` GPUs for deployment ``name`` must fit the owner's limits, with the
    owner's other deployments and the owner's own inference GPU jobs (one squeue for that user)."""
    from hpcserve.config.policy import JobClassName
    from hpcserve.slurm.protocol import JobFilter

    partition = api.policy.for_class(JobClassName.INFERENCE).partition
    jobs = api.slurm.jobs(JobFilter(user=owner, partitions=(partition,)))
    replica_jobs = [r.job_id for r in api.store.replicas() if r.job_id]
    usage = owner_usage(owner, name, api.store.list_deployments(), jobs, replica_jobs,
                        api.site.serving.shards_per_gpu)  # fmt: skip
    check_replicas(api.policy, owner, per_replica, replicas, usage)


def owned(api: ApiContext, caller: Caller, name: str, verb: str, live: bool = True) -> Deployment:
    """The deployment, if the caller owns it or is an admin; ``NotFound`` / ``Forbidden`` otherwise."""
    deployment = api.store.get_deployment(name)
    if deployment is None or (live and deployment.deleted):
        raise NotFound(f"no deployment {name!r} (see: hpcserve deployments)")
    if deployment.owner != caller.user and not is_admin(caller, api.site.admins):
        raise Forbidden(
            f"deployment {name!r} belongs to {deployment.owner}, not {caller.user}: only its owner or an "
            f"admin (`admins` in the service's site config) may {verb} it"
        )
    return deployment


def acting_user(caller: Caller, deployment: Deployment) -> str:
    """Who the store's guarded update runs as: the caller if they own it, else (an admin, checked by
    ``owned``) the owner, so the update still only lands while the owner is unchanged."""
    return caller.user if deployment.owner == caller.user else deployment.owner


# ------------------------------------------------------------------------------------------ changes


def scale(
    api: ApiContext, caller: Caller, name: str, replicas: int | None = None,
    min_replicas: int | None = None, max_replicas: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Set the replicas now and/or the bounds; a rise is checked against the owner's limits. A pool's
    replicas are scaled on the pool, its bounds on its members (the pool takes the most they ask)."""
    from hpcserve.serving.pools import as_replica_spec, is_pool, pool_of, pool_spec
    from hpcserve.serving.spec import DeploymentSpec, build_deployment

    if replicas is None and min_replicas is None and max_replicas is None:
        raise ValidationError("scale: nothing to change (fix: give REPLICAS, --min or --max)")
    deployment = owned(api, caller, name, "scale")
    pool = pool_of(deployment.spec)
    if pool is not None and replicas is not None:
        raise ValidationError(f"scale: {name!r} runs on pool {pool!r}, which has the replicas "
                              f"(fix: hpcserve scale {pool} {replicas})")  # fmt: skip
    if is_pool(deployment.spec) and (min_replicas is not None or max_replicas is not None):
        raise ValidationError(f"scale: pool {name!r} takes its bounds from its members "
                              "(fix: hpcserve scale MEMBER --min/--max)")  # fmt: skip
    spec = DeploymentSpec.model_validate(as_replica_spec(deployment.spec) if is_pool(deployment.spec)
                                         else deployment.spec)  # fmt: skip
    bounds = {"min_replicas": min_replicas, "max_replicas": max_replicas}
    new_spec = (
        build_deployment(bounds, spec) if min_replicas is not None or max_replicas is not None else spec
    )
    desired = deployment.desired_replicas if replicas is None else replicas
    after = max(desired, new_spec.min_replicas)
    if after > wanted_replicas(deployment):  # a member's rise is its pool's, counted once there
        target, wanted = (
            (pool, max(after, pool_wanted(api, pool, deployment.owner))) if pool else (name, after)
        )
        check_owner_limits(api, deployment.owner, target, spec_gpus(api, new_spec), wanted)
    user = acting_user(caller, deployment)
    if new_spec is not spec:
        api.store.update_spec(name, new_spec.model_dump(mode="json"), user=user)
        if pool is not None:
            api.store.refresh_pool(pool, pool_spec)
    if replicas is not None:
        api.store.set_desired(name, replicas, user=user)
    return show(api, caller, name)


def share(api: ApiContext, caller: Caller, name: str, shares: object) -> dict[str, Any]:
    """Replace who else (users, ``@group``, ``all``) may reach the deployment with their API keys."""
    wanted = check_shares(shares)
    deployment = owned(api, caller, name, "share")
    api.store.set_shares(name, wanted, user=acting_user(caller, deployment))
    return show(api, caller, name)


def remove(api: ApiContext, caller: Caller, name: str) -> dict[str, Any]:
    """Delete: desired 0, the row goes with the last replica. A pool's member leaves its pool (the pool is
    deleted with its last member); a pool with members is not removed by name."""
    from hpcserve.serving.pools import is_pool, pool_of, pool_spec

    deployment = owned(api, caller, name, "remove", live=False)
    user = acting_user(caller, deployment)
    if is_pool(deployment.spec) and not deployment.deleted:
        members = pool_members(api, name)
        if members:
            raise ValidationError(
                f"pool {name!r} has members {', '.join(members)} (fix: hpcserve rm each member; the pool "
                "goes with the last)"
            )
    pool = pool_of(deployment.spec)
    if pool is not None:
        gone = api.store.leave_pool(name, pool, pool_spec, user=user)
    else:
        gone = api.store.delete_deployment(name, user=user)
    return {"name": name, "removed": gone, "draining": not gone}


def pool_members(api: ApiContext, pool: str) -> list[str]:
    """The names of the live members of ``pool``."""
    from hpcserve.serving.pools import members_of

    return [d.name for d in members_of(api.store.list_deployments()).get(pool, [])]


# -------------------------------------------------------------------------------------------- reads


def list_rows(api: ApiContext, caller: Caller) -> list[dict[str, Any]]:
    """Every deployment (everyone sees the list), those being deleted included."""
    from hpcserve.serving.scaling import STATE_PREFIX

    by_name: dict[str, list[Replica]] = {}
    for replica in api.store.replicas():
        by_name.setdefault(replica.deployment, []).append(replica)
    scalers = api.store.states(STATE_PREFIX)  # one query for every deployment's autoscaler
    listed = api.store.list_deployments()
    return [row(api, caller, d, by_name.get(d.name, []), scalers.get(STATE_PREFIX + d.name), listed)
            for d in listed]  # fmt: skip


def show(api: ApiContext, caller: Caller, name: str) -> dict[str, Any]:
    deployment = api.store.get_deployment(name)
    if deployment is None:
        raise NotFound(f"no deployment {name!r} (see: hpcserve deployments)")
    from hpcserve.serving.scaling import state_name

    listed = api.store.list_deployments() if deployment.spec.get("pool") else [deployment]
    return row(api, caller, deployment, api.store.replicas(name), api.store.get_state(state_name(name)),
               listed)  # fmt: skip


def row(
    api: ApiContext, caller: Caller, deployment: Deployment, replicas: Sequence[Replica],
    scaler: Mapping[str, Any] | None = None, listed: Sequence[Deployment] = (),
) -> dict[str, Any]:  # fmt: skip
    """What ``hpcserve deployments`` shows. Replica URLs (an engine's host:port, which no key guards) only
    to the owner and admins; ``capped``: why the autoscaler's last scale-up was lowered (the owner's
    limits), None when it was not; ``tier``: its residency tier (a pool member's: its pool's);
    ``kind``: deployment or pool, with a pool's ``members`` and a member's ``pool``."""
    from hpcserve.serving.scaling import ScalerRecord

    spec = deployment.spec
    insider = deployment.owner == caller.user or is_admin(caller, api.site.admins)
    return pool_facts(deployment, listed) | {
        "name": deployment.name, "owner": deployment.owner, "model": spec.get("model"),
        "served_model_name": deployment.served_model_name or spec.get("served_model_name"),
        "engine": spec.get("engine"), "desired": deployment.desired_replicas,
        "min_replicas": spec.get("min_replicas"), "max_replicas": spec.get("max_replicas"),
        "gpus_per_replica": replica_gpus(spec, api.site.serving.shards_per_gpu),
        "ready": sum(r.state == "ready" for r in replicas),
        "starting": sum(r.state == "starting" for r in replicas),
        "draining": sum(r.state == "draining" for r in replicas),
        "queue_depth": queue_depth(api, deployment.name),
        "endpoint": f"{api.site.serving.gateway_url}/v1", "deleting": deployment.deleted,
        "account": deployment.account, "shares": list(deployment.shares or []),
        "capped": ScalerRecord.from_json(scaler).capped,
        "replicas": [{"index": r.index, "state": r.state, "job_id": r.job_id,
                      "url": r.url if insider else None, "phases": r.phases} for r in replicas],
    }  # fmt: skip


def pool_facts(deployment: Deployment, listed: Sequence[Deployment]) -> dict[str, Any]:
    """A row's tier, kind, pool and members (``listed``: the deployments, for a pool's members and a
    member's pool)."""
    from hpcserve.serving.pools import is_pool, pool_of

    pool = pool_of(deployment.spec)
    tier = deployment.tier
    if pool is not None:
        tier = next((d.tier for d in listed if d.name == pool), tier)
    kind = "pool" if is_pool(deployment.spec) else "deployment"
    facts: dict[str, Any] = {"tier": tier or "hot", "kind": kind, "pool": pool, "members": None}
    if is_pool(deployment.spec):
        facts["members"] = [d.name for d in listed if pool_of(d.spec) == deployment.name and not d.deleted]
        facts["max_awake"] = deployment.spec.get("max_awake")
    return facts


def queue_depth(api: ApiContext, name: str) -> int:
    """Waiting requests at the latest samples: the engines' queues plus the gateway's buffer."""
    latest: dict[tuple[int | None, str | None], Any] = {}
    for sample in api.store.engine_samples(name, since=api.clock() - QUEUE_WINDOW):
        latest[(sample.replica, sample.source)] = sample  # each replica, and each gateway
    return sum((s.waiting or 0) + (s.gateway_waiting or 0) for s in latest.values())


def logs(
    api: ApiContext, caller: Caller, name: str, replica: int | None, offsets: Mapping[str, int]
) -> dict[str, Any]:
    """New output of the deployment's replica logs from ``offsets`` (file name -> bytes already read);
    the owner's or an admin's only."""
    from hpcserve.api.replica_logs import read_logs

    deployment = owned(api, caller, name, "read the logs of", live=False)
    replicas = [r for r in api.store.replicas(name) if replica is None or r.index == replica]
    files = read_logs(api.site, deployment.owner, name, replicas, offsets)
    return {"name": name, "files": files}
