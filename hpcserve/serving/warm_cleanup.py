"""Removes a deployment's warm copies on one node: ``python -I -m hpcserve.serving.warm_cleanup FOLDER...``,
the command of the small job the service submits AS THE OWNER on that node once the deployment is off
(``hpcserve.serving.unstage``). It runs with the owner's rights only, so it can remove nothing the owner
could not.

Only a folder hpcserve staged is removed: an absolute path without ``..``, a real folder (not a symlink),
holding the staging manifest (``.hpcserve-manifest.json``, written by ``hpcserve.serving.staging``) as a
plain file. A folder without it is refused and left as it is; a folder that is not there is fine (nothing
staged, or removed before). A copy a replica on this node holds (staging it or serving from it: the
shared lock of ``staging.hold_warm_copy``) is kept: the removal takes the exclusive lock without waiting.
One line per folder on stdout (the job's log).

Exit status 0 when every folder is gone, 1 when one was refused or could not be removed, 2 for bad usage.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import sys
from pathlib import Path

from hpcserve.serving.staging import MANIFEST, lock_path


def refusal(folder: str) -> str | None:
    """Why ``folder`` must not be removed, or None when it is a warm copy hpcserve staged."""
    if not folder.startswith("/") or ".." in folder.split("/") or folder.rstrip("/") == "":
        return "not an absolute path without '..'"
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        return "not a folder (a symlink or a file)"
    try:
        manifest = os.lstat(Path(folder) / MANIFEST)
    except FileNotFoundError:
        return f"no {MANIFEST} in it: hpcserve did not stage it"
    if not stat.S_ISREG(manifest.st_mode):
        return f"its {MANIFEST} is not a plain file"
    return None


def remove(folder: str) -> tuple[bool, str]:
    """Remove one warm copy; whether it is gone now, and the line saying what happened."""
    try:
        why = refusal(folder)
    except FileNotFoundError:
        return True, f"absent {folder}"
    except OSError as exc:
        return False, f"refused {folder}: {exc.strerror}"
    if why is not None:
        return False, f"refused {folder}: {why}"
    fd = os.open(lock_path(Path(folder)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False, f"kept {folder}: a replica on this node is staging or serving it"
    try:
        shutil.rmtree(folder)
    except OSError as exc:
        return False, f"failed {folder}: {exc}"
    finally:
        os.close(fd)
    return True, f"removed {folder}"


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -I -m hpcserve.serving.warm_cleanup FOLDER...", file=sys.stderr)
        return 2
    ok = True
    for folder in argv:
        gone, line = remove(folder)
        ok &= gone
        print(f"warm cleanup on {os.uname().nodename}: {line}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
