"""Copy model weights from the shared cold tier to node-local disk (the warm tier), checked by sha256, and
check a warm copy again without reading the cold one.

The warm copy keeps a manifest (``.hpcserve-manifest.json`` in it): per file, the cold file's size,
mtime_ns and sha256 as they were when it was copied or checked, and the warm file's mtime_ns. A later
start on the same node compares sizes and mtimes on both sides (``stat`` only): when they all match, the
copy is good and nothing is read ("warm-valid"). Only a file whose stat differs is hashed again: the cold
side only when it changed (else its cached sha256 stands), the warm side when it changed. A file is
copied when its warm copy is missing or does not match; the copy hashes the cold bytes as it reads them,
then the copy itself. Copies go to a temporary name and are renamed, so a replica killed mid-copy never
leaves a truncated weight file behind; the manifest is written last, the same way.

A replica holds a shared ``flock`` on the warm copy's lock file (``.<name>.hpcserve-lock`` beside it) from
before it stages until its process ends (``hold_warm_copy``); the off tier's cleanup job
(``hpcserve.serving.warm_cleanup``) removes a copy only under the exclusive lock, so it never removes one
that a replica on the node is staging or serving from. Staging itself takes an exclusive ``flock`` on a
second lock file (``.<name>.hpcserve-stage``, ``stage_alone``): two replicas starting on one node with the
same weights (a pool's, or a deployment scaling up) stage one after the other, so the second finds the
copy valid and reads nothing, where both would have copied every byte.

The warm tier is often shared scratch (one folder per node for every user), so a warm copy is trusted only
when no one else could have written it (``untrusted_entry``): a real folder whose every entry is this
user's own, no symlink, nothing others may write to. Staging creates its folders 0755 and its files
without group or other write, whatever the umask. A copy that fails this (a file swapped in while the
folder was writable, a forged manifest) is set aside and copied again; another user's folder under the
copy's name, or another user's lock file beside it, is refused in one line (the fix: a warm tier of one's
own under the site's). So no user can make another's engine load their weights.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hpcserve.errors import HpcserveError

CHUNK = 1 << 20
MANIFEST = ".hpcserve-manifest.json"
MANIFEST_VERSION = 1
LOCK_SUFFIX = ".hpcserve-lock"
STAGE_SUFFIX = ".hpcserve-stage"


def lock_path(dst: Path) -> Path:
    """The lock file of the warm copy ``dst``: beside it, so removing the copy leaves the lock in place."""
    return dst.parent / f".{dst.name}{LOCK_SUFFIX}"


def hold_warm_copy(dst: Path, own: Path | None = None) -> int:
    """A shared lock on ``dst``'s lock file (waiting while a cleanup removes the copy); the open file
    descriptor holds it, until it is closed or the process ends. Missing folders above ``dst`` are made
    as ``make_warm_parents`` says."""
    make_warm_parents(dst.parent, own)
    return _locked(lock_path(dst), fcntl.LOCK_SH)


def make_warm_parents(parent: Path, own: Path | None) -> None:
    """The missing folders down to ``parent`` (where warm copies sit side by side): shared by every user,
    each is made 1777 (sticky, as /tmp: anyone adds, only the owner removes), except ``own``, the user's
    own folder (``{user}`` in the warm tier), made 0755; an ``own`` of another user is refused."""
    for folder in reversed((parent, *parent.parents)):
        if folder.is_dir():
            continue
        try:
            folder.mkdir(0o755)
        except FileExistsError:
            continue
        folder.chmod(0o755 if folder == own else 0o1777)
    if own is not None and own.stat().st_uid != os.geteuid():
        raise HpcserveError(
            f"cannot stage into {own}: the folder is another user's (fix: ask the site's admins to fix "
            "the warm tier's {user} folders)"
        )


def _locked(path: Path, how: int) -> int:
    """The open lock file ``path`` (made if missing), locked ``how``; refused when another user's (who
    could hold it forever)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            raise HpcserveError(
                f"cannot stage beside {path}: the lock file is another user's (fix: give the deployment "
                "a warm tier of its own under the site's, --warm-tier <the site's warm tier>/{user})"
            )
        fcntl.flock(fd, how)
    except BaseException:
        os.close(fd)
        raise
    return fd


HashFile = Callable[[Path], str]


@dataclass(frozen=True, slots=True)
class StageReport:
    """What staging did: ``kind`` "warm-valid" | "hashed" | "copied" (``hpcserve.serving.phases``)."""

    copied: int
    skipped: int
    bytes_copied: int
    bytes_hashed: int = 0

    @property
    def kind(self) -> str:
        if self.copied:
            return "copied"
        return "hashed" if self.bytes_hashed else "warm-valid"


@dataclass(frozen=True, slots=True)
class Entry:
    """One file of the manifest: the cold file's stat and sha256, and its warm copy's mtime."""

    size: int
    mtime_ns: int
    sha256: str
    warm_mtime_ns: int

    def cold_matches(self, cold: os.stat_result) -> bool:
        return self.size == cold.st_size and self.mtime_ns == cold.st_mtime_ns

    def warm_matches(self, warm: os.stat_result | None) -> bool:
        return warm is not None and self.size == warm.st_size and self.warm_mtime_ns == warm.st_mtime_ns


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def stage_weights(src: Path, dst: Path, hash_file: HashFile = sha256_of) -> StageReport:
    """Mirror the files under ``src`` into ``dst``, checked against ``dst``'s manifest first; raises if a
    copy does not match its source. ``hash_file`` hashes every whole file read for a check. A warm copy
    that another user could have written is set aside first (``set_aside_untrusted``)."""
    if not src.is_dir():
        raise HpcserveError(f"cannot stage {src}: not a folder (fix: point the model at the cold-tier copy)")
    set_aside_untrusted(dst)
    old = read_manifest(dst)
    stager = _Stager(hash_file)
    entries = {rel: stager.stage(src / rel, dst / rel, old.get(rel)) for rel in _cold_files(src)}
    for rel in set(old) - set(entries):  # files the cold copy no longer has: the engine must not load them
        (dst / rel).unlink(missing_ok=True)
    if entries != old:
        write_manifest(dst, entries)
    return StageReport(stager.copied, len(entries) - stager.copied, stager.bytes_copied, stager.bytes_hashed)


def untrusted_entry(dst: Path) -> Path | None:
    """The first entry of the warm copy ``dst`` that another user could have written (None: ``dst`` is
    trusted, or absent): a symlink, an entry this user does not own, or one others may write to."""
    me = os.geteuid()
    for root, dirs, files in os.walk(dst):  # symlinks to folders are listed in dirs, never followed
        for path in (Path(root), *(Path(root) / name for name in (*dirs, *files))):
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode) or info.st_uid != me or info.st_mode & 0o022:
                return path
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        return dst
    return None


def set_aside_untrusted(dst: Path) -> None:
    """A warm copy with an entry another user could have written (``untrusted_entry``) is renamed out of
    the way and removed, so its files and manifest are never served; one this user cannot move (another
    user's folder) is refused in one line."""
    found = untrusted_entry(dst)
    if found is None:
        return
    aside = dst.with_name(f".{dst.name}.untrusted.{os.getpid()}")
    try:
        dst.rename(aside)
    except OSError as exc:
        raise HpcserveError(
            f"cannot stage into {dst}: {found} is another user's or writable by others ({exc.strerror}) "
            "(fix: give the deployment a warm tier of its own under the site's: "
            "--warm-tier <the site's warm tier>/{user})"
        ) from exc
    if aside.is_symlink() or not aside.is_dir():
        aside.unlink(missing_ok=True)
    else:
        shutil.rmtree(aside, ignore_errors=True)


def _mkdirs(folder: Path) -> None:
    """``folder`` and its missing parents, each 0755 whatever the umask (no one else may write there)."""
    if folder.is_dir():
        return
    _mkdirs(folder.parent)
    try:
        folder.mkdir(0o755)
    except FileExistsError:
        return
    folder.chmod(0o755)


def stage_alone(src: Path, dst: Path, hash_file: HashFile = sha256_of) -> StageReport:
    """``stage_weights`` while no other process on the node stages ``dst`` (waits for one that does)."""
    make_warm_parents(dst.parent, None)  # made already when the replica holds the copy (``hold_warm_copy``)
    fd = _locked(dst.parent / f".{dst.name}{STAGE_SUFFIX}", fcntl.LOCK_EX)
    try:
        return stage_weights(src, dst, hash_file)
    finally:
        os.close(fd)


class _Stager:
    """One staging run's per-file work and its counts."""

    def __init__(self, hash_file: HashFile) -> None:
        self.hash_file = hash_file
        self.copied = self.bytes_copied = self.bytes_hashed = 0

    def stage(self, source: Path, target: Path, entry: Entry | None) -> Entry:
        """The file's manifest entry once ``target`` is a good copy of ``source``."""
        cold, warm = source.stat(), _stat(target)
        cached = entry.sha256 if entry is not None and entry.cold_matches(cold) else None
        if entry is not None and cached is not None and entry.warm_matches(warm):
            return entry
        if warm is not None and warm.st_size == cold.st_size:
            want = cached or self._hash(source, cold)
            if self._hash(target, warm) == want:
                return Entry(cold.st_size, cold.st_mtime_ns, want, warm.st_mtime_ns)
            cached = want
        digest, copied = self._copy(source, target, cached)
        return Entry(cold.st_size, cold.st_mtime_ns, digest, copied.st_mtime_ns)

    def _hash(self, path: Path, stat: os.stat_result) -> str:
        self.bytes_hashed += stat.st_size
        return self.hash_file(path)

    def _copy(self, source: Path, target: Path, want: str | None) -> tuple[str, os.stat_result]:
        """Copy through a temporary file, checked: the bytes read hash to ``want`` (when known) and the
        copy hashes to what was read."""
        _mkdirs(target.parent)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            read = _copy_hashing(source, tmp)
            if read != (want or read) or self._hash(tmp, tmp.stat()) != read:
                raise HpcserveError(
                    f"checksum mismatch copying {source} to {target} (fix: check the cold tier)"
                )
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
        self.copied, self.bytes_copied = self.copied + 1, self.bytes_copied + source.stat().st_size
        return read, target.stat()


def _copy_hashing(source: Path, target: Path) -> str:
    """Copy ``source`` to ``target``; the sha256 of the bytes read (the cold side is read once)."""
    digest = hashlib.sha256()
    with source.open("rb") as f, target.open("wb") as out:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
    target.chmod(stat.S_IMODE(source.stat().st_mode) & ~0o022)  # as the cold file's, writable by us alone
    return digest.hexdigest()


def _cold_files(src: Path) -> list[str]:
    """The cold copy's files, relative, sorted; a manifest or partial file of a staging there is skipped."""
    files = (p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    return sorted(f for f in files if not _ours(Path(f).name))


def _ours(name: str) -> bool:
    return name.startswith(MANIFEST) or (name.startswith(".") and name.endswith(".partial"))


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def read_manifest(dst: Path) -> dict[str, Entry]:
    """The warm copy's manifest; empty when it is missing, unreadable or of another version (then every
    file is checked by hash)."""
    try:
        raw = json.loads((dst / MANIFEST).read_text())
        if raw.get("version") != MANIFEST_VERSION:
            return {}
        return {str(rel): _entry(value) for rel, value in raw["files"].items() if _safe(str(rel))}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _entry(value: Mapping[str, Any]) -> Entry:
    return Entry(
        int(value["size"]), int(value["mtime_ns"]), str(value["sha256"]), int(value["warm_mtime_ns"])
    )


def _safe(rel: str) -> bool:
    """A manifest's path stays inside the warm copy."""
    return bool(rel) and not rel.startswith("/") and ".." not in rel.split("/")


def write_manifest(dst: Path, entries: Mapping[str, Entry]) -> None:
    """The manifest, written to a temporary name and renamed over the old one."""
    _mkdirs(dst)
    files = {rel: asdict(entry) for rel, entry in sorted(entries.items())}
    tmp = dst / f"{MANIFEST}.{os.getpid()}.partial"
    tmp.write_text(json.dumps({"version": MANIFEST_VERSION, "files": files}, indent=1))
    tmp.replace(dst / MANIFEST)
