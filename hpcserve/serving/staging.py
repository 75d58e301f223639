"""Copy model weights from the shared cold tier to node-local disk (the warm tier), checked by sha256.

A file already there with the same size and checksum is skipped, so a replica that starts again on the
same node loads at local-disk speed at once. Each file is copied to a temporary name and renamed, so a
replica killed mid-copy never leaves a truncated weight file behind.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from hpcserve.errors import HpcserveError

CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class StageReport:
    copied: int
    skipped: int
    bytes_copied: int


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def stage_weights(src: Path, dst: Path) -> StageReport:
    """Mirror the files under ``src`` into ``dst``; raises if a copy does not match its source."""
    if not src.is_dir():
        raise HpcserveError(f"cannot stage {src}: not a folder (fix: point the model at the cold-tier copy)")
    copied = skipped = size = 0
    for source in sorted(p for p in src.rglob("*") if p.is_file()):
        target = dst / source.relative_to(src)
        want = sha256_of(source)
        if target.is_file() and target.stat().st_size == source.stat().st_size and sha256_of(target) == want:
            skipped += 1
            continue
        _copy_checked(source, target, want)
        copied, size = copied + 1, size + source.stat().st_size
    return StageReport(copied, skipped, size)


def _copy_checked(source: Path, target: Path, want: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial")
    shutil.copyfile(source, tmp)
    if sha256_of(tmp) != want:
        tmp.unlink()
        raise HpcserveError(f"checksum mismatch copying {source} to {target} (fix: check the cold tier)")
    tmp.replace(target)
