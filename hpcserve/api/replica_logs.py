"""Reading a deployment's replica logs for its owner, as the service (root or the service account).

The logs live in the owner's own folder, which the owner controls: they could put a symlink, a hard link
or a FIFO where a log should be, to make the service read a file the owner may not. So the folder is
walked from ``serving.replica_dir`` one component at a time without following any symlink (``openat``
with ``O_NOFOLLOW``), and a log is read only if it is a regular file owned by the deployment's owner (or
by the service itself, which wrote replica files before replicas ran as their owners).
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcserve.errors import HpcserveError

if TYPE_CHECKING:
    from hpcserve.config import SiteConfig
    from hpcserve.store import Replica

MAX_READ = 256 * 1024  # bytes of one file per call: `logs` asks again while ``more``
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def replica_folder(site: SiteConfig, owner: str, deployment: str) -> Path:
    """Where the service keeps a deployment's replica files: ``hpcserve.serving.launcher.replica_folder``
    where the launcher has it, else ``<replica_dir>/<owner>/<deployment>``."""
    from hpcserve.serving import launcher

    provided = getattr(launcher, "replica_folder", None)
    if callable(provided):
        return Path(provided(site, owner, deployment))
    return site.serving.replica_path() / owner / deployment


def read_logs(
    site: SiteConfig, owner: str, name: str, replicas: Sequence[Replica], offsets: Mapping[str, int]
) -> list[dict[str, Any]]:
    """For each log file of ``replicas``: what follows ``offsets[file]``, at most ``MAX_READ`` bytes."""
    allowed = _allowed_uids(owner)
    files: list[dict[str, Any]] = []
    try:
        folder = open_under(site.serving.replica_path(), replica_folder(site, owner, name))
    except (FileNotFoundError, NotADirectoryError):
        return files
    with _closing(folder):
        for replica in replicas:
            if replica.job_id:
                files += _job_logs(folder, replica, allowed, offsets)
    return files


def open_under(root: Path, target: Path) -> int:
    """A directory fd of ``target``, reached from ``root`` without following a symlink below ``root``."""
    try:
        parts = target.relative_to(root).parts
    except ValueError:
        raise HpcserveError(f"replica folder {target} is not under serving.replica_dir {root}") from None
    fd = os.open(os.path.realpath(root), _DIR)
    for part in parts:
        if part in ("", ".", ".."):
            os.close(fd)
            raise HpcserveError(f"replica folder {target}: {part!r} in the path")
        try:
            child = os.open(part, _DIR, dir_fd=fd)
        finally:
            os.close(fd)
        fd = child
    return fd


def _job_logs(
    folder: int, replica: Replica, allowed: set[int], offsets: Mapping[str, int]
) -> list[dict[str, Any]]:
    """The job's logs in its own folder (submitit's ``%j``) or in the deployment's folder."""
    job_id = str(replica.job_id)
    found: list[dict[str, Any]] = []
    with suppress(OSError), _closing(os.open(job_id, _DIR, dir_fd=folder)) as job_dir:
        found += _read_matching(job_dir, job_id, replica.index, allowed, offsets)
    found += _read_matching(folder, job_id, replica.index, allowed, offsets)
    return found


def _read_matching(
    dir_fd: int, job_id: str, index: int, allowed: set[int], offsets: Mapping[str, int]
) -> list[dict[str, Any]]:
    names = sorted(n for n in os.listdir(dir_fd) if n.startswith(f"{job_id}_") and "_log." in n)
    found = []
    for name in names:
        read = _read_one(dir_fd, name, allowed, int(offsets.get(name, 0)))
        if read is not None:
            found.append({"name": name, "replica": index, "job_id": job_id, **read})
    return found


def _read_one(dir_fd: int, name: str, allowed: set[int], offset: int) -> dict[str, Any] | None:
    """What follows ``offset`` in a regular file owned by an allowed uid; None for anything else."""
    try:
        fd = os.open(name, _FILE, dir_fd=dir_fd)
    except OSError:  # a symlink (ELOOP), gone, or not ours to open
        return None
    with _closing(fd):
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid not in allowed:
            return None
        start = offset if 0 <= offset <= info.st_size else 0  # truncated or rewritten: from the top
        data = os.pread(fd, MAX_READ, start)
    more = start + len(data) < info.st_size
    if more and b"\n" in data:  # whole lines, so a character is never cut in two
        data = data[: data.rindex(b"\n") + 1]
    return {"offset": start + len(data), "data": data.decode(errors="replace"), "more": more}


def _allowed_uids(owner: str) -> set[int]:
    uids = {os.geteuid()}
    with suppress(KeyError):
        uids.add(pwd.getpwnam(owner).pw_uid)
    return uids


@contextmanager
def _closing(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)
