"""Writes a replica's job files AS ITS OWNER: ``python -I -m hpcserve.serving.owner_files REPLICA_DIR
DEPLOYMENT``, run through ``runuser -u OWNER --`` (or ``sudo -n -u OWNER --``), with a JSON object
``{name: base64}`` on stdin.

The files go to ``REPLICA_DIR/<this process's user>/<DEPLOYMENT>/``: the user part comes from the kernel
(``getuid``), never from an argument. Each folder is made 0700 if missing, opened without following
symlinks, and must belong to this user; each file is written 0600 to a fresh temporary name
(``O_CREAT|O_EXCL|O_NOFOLLOW``, relative to the folder's descriptor) and renamed into place. The service
itself (root) never writes into a folder a user can write, so no path a user controls is followed with
root's rights. Standard library only: it starts in a few milliseconds.

Exit status 0 when every file is written; otherwise one line on stderr and status 1.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import pwd
import stat
import sys
from collections.abc import Mapping

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class OwnerFilesError(Exception):
    """A folder or file that cannot be made safely; the message is one line."""


def check_component(what: str, name: str) -> str:
    """``name`` if it is one plain path component (no ``/``, not ``.`` or ``..``, no NUL)."""
    if not name or name in (".", "..") or "/" in name or "\0" in name or name.startswith("-"):
        raise OwnerFilesError(f"{what} {name!r} is not a plain file name")
    return name


def open_own_dir(parent_fd: int, name: str, uid: int) -> int:
    """``name`` in ``parent_fd`` as a 0700 folder of ``uid`` (made if missing), opened without following
    a symlink; refused when it belongs to someone else."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:  # ELOOP: a symlink; ENOTDIR: a file
        raise OwnerFilesError(f"{name}: not a folder this user may use ({exc.strerror})") from exc
    info = os.fstat(fd)
    if info.st_uid != uid:
        os.close(fd)
        raise OwnerFilesError(f"{name}: belongs to uid {info.st_uid}, not to this user (uid {uid})")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.fchmod(fd, 0o700)
    return fd


def open_base(path: str) -> int:
    """The replica folder (made by the service): a real folder no other user may write into, except a
    sticky one (1733, for a non-root service) where nobody can move another's entries."""
    try:
        fd = os.open(path, DIR_FLAGS)
    except OSError as exc:
        raise OwnerFilesError(f"{path}: cannot open the replica folder ({exc.strerror})") from exc
    mode = os.fstat(fd).st_mode
    if mode & 0o022 and not mode & stat.S_ISVTX:
        os.close(fd)
        raise OwnerFilesError(f"{path}: writable by others without the sticky bit")
    return fd


def write_file(dir_fd: int, name: str, data: bytes) -> None:
    """``name`` (mode 0600) holding ``data``, atomically: written under a fresh name, then renamed."""
    check_component("file", name)
    tmp = f".{name}.{os.getpid()}.tmp"
    fd = os.open(tmp, FILE_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def write_owner_files(base: str, deployment: str, files: Mapping[str, bytes]) -> None:
    """Every file into ``base/<user>/<deployment>/``."""
    uid = os.getuid()
    user = check_component("user", pwd.getpwuid(uid).pw_name)
    check_component("deployment", deployment)
    fds = [open_base(base)]
    try:
        fds.append(open_own_dir(fds[-1], user, uid))
        fds.append(open_own_dir(fds[-1], deployment, uid))
        for name, data in files.items():
            write_file(fds[-1], name, data)
    finally:
        for fd in reversed(fds):
            os.close(fd)


def decode_files(text: str) -> dict[str, bytes]:
    """stdin's ``{name: base64}`` -> ``{name: bytes}``."""
    try:
        raw = json.loads(text or "{}")
        if not isinstance(raw, dict):
            raise OwnerFilesError("stdin: expected a JSON object of file names to base64")
        return {str(name): base64.b64decode(value, validate=True) for name, value in raw.items()}
    except (ValueError, TypeError, binascii.Error) as exc:
        raise OwnerFilesError(f"stdin: {exc}") from exc


def encode_files(files: Mapping[str, bytes]) -> str:
    """What ``decode_files`` reads: the caller's side."""
    return json.dumps({name: base64.b64encode(data).decode() for name, data in files.items()})


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -I -m hpcserve.serving.owner_files REPLICA_DIR DEPLOYMENT", file=sys.stderr)
        return 2
    try:
        write_owner_files(argv[0], argv[1], decode_files(sys.stdin.read()))
    except (OwnerFilesError, OSError) as exc:
        print(f"owner files: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
