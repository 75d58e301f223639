"""Replica jobs: one Slurm job per replica, submitted AS THE DEPLOYMENT'S OWNER through submitit to the
inference partition.

Each job holds the replica's GPUs as GRES, carries ``hpcserve:replica:<deployment>:<index>`` in its
``--comment``, has a finite time limit, and is requeued if its node fails. The policy's inference class
decides partition, QoS and limits, counted against the owner, like any submission of theirs. The job is
charged to the deployment's ``account``, or to the owner's default association when it has none.

Files: ``<replica_dir>/<owner>/<deployment>/`` (``replica_folder``) holds submitit's pickle and logs and the
replica's secret and engine key (one 0600 file; never in argv nor in the sbatch script, which other users
read in /proc and ``scontrol show job``). ``replica_dir`` is the service's own (0755; 1733 for a non-root
service, whose owners make their folders themselves); each ``<owner>`` folder is the owner's, 0700.
Everything inside is written by a process of the owner (``hpcserve.serving.owner_files``), never by the
service, so the owner's code runs with the owner's rights only, and no path a user controls is followed
with the service's.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import secrets
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcserve.config.policy import JobClassName
from hpcserve.errors import ConfigError, ValidationError
from hpcserve.jobs.runas import Owner, OwnerRunner, owner_files_argv
from hpcserve.jobs.spec import JobRequest
from hpcserve.serving.owner_files import encode_files
from hpcserve.serving.replica import ReplicaCredentials, ReplicaMain, secret_file_name
from hpcserve.serving.site_storage import is_folder, members_with_site_storage, with_site_storage
from hpcserve.serving.tags import REPLICA_KIND, replica_tag, secret_hash

if TYPE_CHECKING:
    from hpcserve.config import SiteConfig
    from hpcserve.config.sections import Storage
    from hpcserve.jobs.submit import Submitter
    from hpcserve.serving.spec import DeploymentSpec
    from hpcserve.slurm.protocol import CommandRunner
    from hpcserve.store import Deployment

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
ROOT_MODE = 0o755  # the service runs as root: it makes each owner's folder and gives it to them
SHARED_MODE = 0o1733  # a non-root service: owners make their own folder; sticky, and nobody can list it


def replica_folder(site_or_dir: SiteConfig | Path, owner: str, deployment: str) -> Path:
    """Where the replicas of ``deployment`` keep submitit's pickle and logs (``<job id>_0_log.out``)."""
    base = site_or_dir if isinstance(site_or_dir, Path) else site_or_dir.serving.replica_path()
    return base / owner / deployment


def replica_request(
    spec: DeploymentSpec, index: int, user: str, account: str | None = None, hold: bool = False,
    shards_per_gpu: int = 4,
) -> JobRequest:  # fmt: skip
    """The replica job's request. A ``gpu_fraction`` holds ceil(fraction x ``shards_per_gpu``) shards of one
    GPU (gres/shard), a ``mig_profile`` that MIG slice (``gpu:PROFILE:1``), instead of whole GPUs."""
    from hpcserve.jobs.policy import time_option
    from hpcserve.placement.shards import part_gres

    gres = part_gres(spec.gpu_fraction, spec.mig_profile, shards_per_gpu)
    return JobRequest(
        job_class=JobClassName.INFERENCE,
        name=f"{spec.name}-r{index}",
        user=user,
        partition=spec.partition,
        nodes=spec.nodes_per_replica,
        gpus_per_node=0 if gres else spec.gpus_per_replica,
        time_s=time_option(spec.time_limit) if spec.time_limit else None,
        account=account,
        hold=hold,
        gres=gres,
    )


def lookup_owner(user: str) -> Owner:
    """The owner's account as the system knows it; a ValidationError when there is none."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ValidationError(f"owner {user!r} has no Unix account on this host (fix: create it)") from None
    try:
        group = grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        group = str(entry.pw_gid)
    return Owner(entry.pw_name, group, entry.pw_uid, entry.pw_gid)


def prepare_replica_root(replica_dir: Path, owner: Owner) -> None:
    """The service's replica folder (made when missing; it must be the service's own) and, when the service
    is root, the owner's 0700 folder in it, given to the owner. Safe to call for every launch."""
    euid = os.geteuid()
    mode = ROOT_MODE if euid == 0 else SHARED_MODE
    replica_dir.mkdir(mode=mode, parents=True, exist_ok=True)
    fd = os.open(replica_dir, DIR_FLAGS)
    try:
        info = os.fstat(fd)
        if info.st_uid != euid:
            problem = f"{replica_dir} belongs to uid {info.st_uid}, not to the service (uid {euid})"
            fix = "remove it, or name a new path: the service makes it"
            raise ConfigError("site config", "serving.replica_dir", problem, fix)
        if stat.S_IMODE(info.st_mode) != mode:
            os.fchmod(fd, mode)
        if euid == 0:
            _give_owner_folder(fd, replica_dir, owner)
    finally:
        os.close(fd)


def _give_owner_folder(base_fd: int, replica_dir: Path, owner: Owner) -> None:
    """``<replica_dir>/<owner>``: 0700 and the owner's. Only the service can make entries in its folder, so
    an entry there that is not the owner's (nor the service's, half made) is refused, never followed."""
    uid, gid = owner.uid if owner.uid is not None else -1, owner.gid if owner.gid is not None else -1
    with contextlib.suppress(FileExistsError):
        os.mkdir(owner.user, 0o700, dir_fd=base_fd)
    try:
        fd = os.open(owner.user, DIR_FLAGS, dir_fd=base_fd)
    except OSError as exc:
        problem = f"not a folder ({exc.strerror})"
        raise ConfigError(str(replica_dir / owner.user), "", problem, "remove it") from exc
    try:
        info = os.fstat(fd)
        if info.st_uid not in (uid, os.geteuid()):
            raise ConfigError(
                str(replica_dir / owner.user),
                "",
                f"belongs to uid {info.st_uid}, not to {owner.user}",
                "remove it",
            )
        if info.st_uid != uid or info.st_gid != gid:
            os.fchown(fd, uid, gid)
        if stat.S_IMODE(info.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Launched:
    """A submitted replica: its Slurm job id, the hash of the secret it announces itself with, and the key
    its engine requires on /v1 (the service keeps it, for the gateway)."""

    job_id: str
    secret_hash: str
    engine_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ReplicaLauncher:
    """Submits replicas as their owners (``method``: the site's ``service.submit_as``). ``runner`` runs the
    owner's commands (give it the environment of ``runas.owner_environ``); the replica reaches the
    service's API at ``service_socket`` (or ``service_url``) to announce itself. ``env`` (the site's
    ``serving.replica_env``) is exported by the job's script: it reaches the job, never a command the
    service runs as root (``runuser``, ``sbatch --uid``), nor the owner's commands on the login node."""

    replica_dir: Path
    method: str
    runner: CommandRunner
    service_socket: str | None
    service_url: str | None
    ready_timeout_s: float
    timeout_s: float = 30.0
    hold: bool = (
        False  # lending overlap: submitted held; the controller's evictor picks its node, releases it
    )
    python: str = sys.executable
    owner_of: Callable[[str], Owner] = lookup_owner
    prepare: Callable[[Path, Owner], None] = field(default=prepare_replica_root)
    env: Mapping[str, str] = field(default_factory=dict)
    storage: Storage | None = None  # the site's: warm tier, cold tier and load format (serving.site_storage)
    is_dir: Callable[[str], bool] = is_folder
    shards_per_gpu: int = 4  # the site's serving.shards_per_gpu: what a gpu_fraction is counted in

    def launch(
        self, submitter: Submitter, deployment: Deployment, spec: DeploymentSpec, index: int,
        members: Sequence[Mapping[str, Any]] | None = None,
    ) -> Launched:  # fmt: skip
        """Submit replica ``index`` of ``deployment`` as its owner; its secret and engine key go only into a
        0600 file of the owner; the secret's hash and the engine key come back. ``members``: a pool
        replica's member specs (one engine each; None: not a pool)."""
        from hpcserve.slurm.cli_backend import CliSlurmClient

        owner = self.owner_of(deployment.owner)
        self.prepare(self.replica_dir, owner)
        folder = replica_folder(self.replica_dir, owner.user, spec.name)
        credentials = ReplicaCredentials(secrets.token_urlsafe(32), secrets.token_urlsafe(32))
        secret_name = secret_file_name(index)
        runner = OwnerRunner(self.runner, self.method, owner)

        def write(files: Mapping[str, bytes]) -> None:
            argv = owner_files_argv(self.python, str(self.replica_dir), spec.name)
            runner(
                argv, timeout=self.timeout_s, stdin=encode_files({**files, secret_name: credentials.encode()})
            )

        pool = {} if members is None else {"members": [
            m.model_dump(mode="json") for m in members_with_site_storage(members, self.storage, self.is_dir)
        ]}  # fmt: skip
        node_spec = with_site_storage(spec, self.storage, self.is_dir).model_dump(mode="json")
        main = ReplicaMain(node_spec, index, str(folder), self.ready_timeout_s,
                           secret_name, self.service_socket, self.service_url, **pool)  # fmt: skip
        job_id, _ = submitter.submit_owned(
            replica_request(spec, index, owner.user, deployment.account, self.hold, self.shards_per_gpu),
            main, (), folder,
            write=write, sbatch=CliSlurmClient(runner, timeout=self.timeout_s), kind=REPLICA_KIND,
            tag=replica_tag(spec.name, index), requeue=True, env=self.env,
        )  # fmt: skip
        return Launched(job_id, secret_hash(credentials.secret), credentials.engine_key)
