"""Running a command as another Unix user (a replica's owner), as argv lists: no shell, no I/O.

The site's ``service.submit_as`` chooses how:
- ``runuser``: ``runuser -u OWNER -- CMD`` (the service runs as root);
- ``sudo``: ``sudo -n -u OWNER -- CMD`` (a non-root service account, allowed by a sudoers rule that names
  the commands: ``sbatch`` and the owner-files helper, see ``owner_files_argv``);
- ``sbatch-uid``: ``sbatch --uid=OWNER --gid=GROUP`` (root only, Slurm 22.05 has it); other commands
  (the files helper) run through ``runuser``, which root has too.

``OwnerRunner`` wraps a command runner so that every command it runs is the owner's: inject it into a Slurm
client and that client's ``sbatch`` submits as the owner, charged to the owner's association.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from hpcserve.errors import ConfigError, ValidationError

if TYPE_CHECKING:
    from hpcserve.slurm.protocol import CommandRunner
    from hpcserve.slurm.runner import CommandResult

Method = Literal["runuser", "sudo", "sbatch-uid"]
METHODS: tuple[str, ...] = get_args(Method)
OWNER_FILES_MODULE = "hpcserve.serving.owner_files"
# POSIX portable user names (plus the trailing $ of machine accounts): never an option, never a path.
_USER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?$")


@dataclass(frozen=True, slots=True)
class Owner:
    """A Unix account to run as: its name and its primary group's name (for ``sbatch --gid``), with their
    numbers when known (the service gives the owner's folder to them)."""

    user: str
    group: str
    uid: int | None = None
    gid: int | None = None

    def __post_init__(self) -> None:
        check_name("owner", self.user)
        check_name("owner's group", self.group)


def check_name(what: str, name: str) -> str:
    """``name`` if it is a plain Unix user or group name; it never starts with ``-`` or holds a ``/``."""
    if not _USER_NAME.match(name):
        raise ValidationError(f"{what} {name!r} is not a Unix account name (fix: letters, digits, _ . -)")
    return name


def owner_prefix(method: str, owner: str) -> list[str]:
    """The argv prefix that runs a command as ``owner`` (``sbatch-uid`` runs its helpers with runuser)."""
    check_name("owner", owner)
    if method == "sudo":
        return ["sudo", "-n", "-u", owner, "--"]
    if method in ("runuser", "sbatch-uid"):
        return ["runuser", "-u", owner, "--"]
    raise ConfigError(
        "site config", "service.submit_as", f"unknown method {method!r}", f"one of {', '.join(METHODS)}"
    )


def as_owner(method: str, owner: Owner, argv: Sequence[str]) -> list[str]:
    """``argv`` run as ``owner``: ``sbatch`` gets ``--uid/--gid`` with ``sbatch-uid``, all else a prefix."""
    if method == "sbatch-uid" and argv and argv[0] == "sbatch":
        return [argv[0], f"--uid={owner.user}", f"--gid={owner.group}", *argv[1:]]
    return [*owner_prefix(method, owner.user), *argv]


def owner_files_argv(python: str, replica_dir: str, deployment: str) -> list[str]:
    """The owner-files helper's command (before the prefix): ``python -I`` so that nothing from the
    working directory or ``PYTHON*`` variables is imported as the owner."""
    return [python, "-I", "-m", OWNER_FILES_MODULE, replica_dir, deployment]


def owner_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment for a command run as an owner: only what finds the programs and the cluster. The
    service's own variables (a database URL, a password) never reach a user's job, which sbatch would
    otherwise export into it; ``runuser``/``sudo`` set the owner's HOME, USER and LOGNAME."""
    return {name: environ[name] for name in OWNER_ENV if name in environ}


OWNER_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "SLURM_CONF")


def check_service_identity(method: str, euid: int) -> None:
    """``runuser`` and ``sbatch --uid`` need root; refuse to run a controller that could not submit."""
    if method in ("runuser", "sbatch-uid") and euid != 0:
        raise ConfigError(
            "site config", "service.submit_as", f"{method!r} needs root, but this process runs as uid {euid}",
            "run `hpcserve service` as root, or use submit_as: sudo with the sudoers rule",
        )  # fmt: skip


class OwnerRunner:
    """A command runner whose commands all run as ``owner`` (see ``as_owner``)."""

    def __init__(self, base: CommandRunner, method: str, owner: Owner) -> None:
        owner_prefix(method, owner.user)  # a bad method fails here, not at the first command
        self._base, self._method, self._owner = base, method, owner

    def __call__(self, argv: Sequence[str], *, timeout: float, stdin: str | None = None) -> CommandResult:
        return self._base(as_owner(self._method, self._owner, argv), timeout=timeout, stdin=stdin)

    def lines(
        self, argv: Sequence[str], *, timeout: float, env: Mapping[str, str | None] | None = None
    ) -> Iterator[str]:
        return self._base.lines(as_owner(self._method, self._owner, argv), timeout=timeout, env=env)
