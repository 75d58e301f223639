"""Staging weights to the warm tier: copied once, then checked by the manifest without reading the cold copy.

Every whole-file hash goes through ``stage_weights``'s ``hash_file``; the tests hand it the real sha256
wrapped in a counter, so "no cold hash" is counted, not timed.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from hpcserve.errors import HpcserveError
from hpcserve.serving.staging import (
    MANIFEST,
    StageReport,
    read_manifest,
    sha256_of,
    stage_alone,
    stage_weights,
)


class CountingHash:
    """sha256_of, counting the files it reads."""

    def __init__(self) -> None:
        self.read: list[Path] = []

    def __call__(self, path: Path) -> str:
        self.read.append(path)
        return sha256_of(path)

    def under(self, root: Path) -> list[Path]:
        return [p for p in self.read if p.is_relative_to(root)]


@pytest.fixture
def cold(tmp_path: Path) -> Path:
    root = tmp_path / "cold" / "tiny-model"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"layers": 2}')
    (root / "model-00001.safetensors").write_bytes(os.urandom(300_000))
    (root / "sub" / "tokenizer.json").write_bytes(os.urandom(5_000))
    return root


def stage(cold: Path, warm: Path) -> tuple[StageReport, CountingHash]:
    counter = CountingHash()
    return stage_weights(cold, warm, hash_file=counter), counter


def test_first_stage_copies_every_file_and_writes_the_manifest(cold: Path, tmp_path: Path) -> None:
    warm = tmp_path / "warm" / "tiny-model"
    report, counter = stage(cold, warm)
    assert (report.kind, report.copied, report.skipped) == ("copied", 3, 0)
    assert report.bytes_copied == 305_000 + len('{"layers": 2}')
    for rel in ("config.json", "model-00001.safetensors", "sub/tokenizer.json"):
        assert (warm / rel).read_bytes() == (cold / rel).read_bytes()
    manifest = read_manifest(warm)
    assert sorted(manifest) == ["config.json", "model-00001.safetensors", "sub/tokenizer.json"]
    assert manifest["config.json"].sha256 == sha256_of(cold / "config.json")
    assert counter.under(cold) == []  # the copy hashes the cold bytes as it reads them: one read
    assert not list(warm.rglob("*.partial"))


def test_second_stage_reads_nothing_when_the_manifest_matches(cold: Path, tmp_path: Path) -> None:
    warm = tmp_path / "warm" / "tiny-model"
    stage(cold, warm)
    before = {p: p.stat().st_mtime_ns for p in warm.rglob("*")}
    report, counter = stage(cold, warm)
    assert report == StageReport(copied=0, skipped=3, bytes_copied=0, bytes_hashed=0)
    assert report.kind == "warm-valid"
    assert counter.read == []  # neither the cold copy nor the warm one was hashed
    assert {p: p.stat().st_mtime_ns for p in warm.rglob("*")} == before  # nothing rewritten


def test_a_missing_manifest_hashes_both_sides_and_copies_nothing(cold: Path, tmp_path: Path) -> None:
    warm = tmp_path / "warm" / "tiny-model"
    stage(cold, warm)
    (warm / MANIFEST).unlink()
    report, counter = stage(cold, warm)
    assert (report.kind, report.copied) == ("hashed", 0)
    assert len(counter.under(cold)) == 3 and len(counter.under(warm)) == 3
    assert report.bytes_hashed == 2 * 305_013
    assert (warm / MANIFEST).is_file()
    assert stage(cold, warm)[0].kind == "warm-valid"  # the manifest is back


def test_a_touched_warm_file_is_hashed_alone_with_the_cached_cold_hash(cold: Path, tmp_path: Path) -> None:
    warm = tmp_path / "warm" / "tiny-model"
    stage(cold, warm)
    os.utime(warm / "config.json", ns=(1, 1))
    report, counter = stage(cold, warm)
    assert report.kind == "hashed"
    assert counter.read == [warm / "config.json"]  # the cold side's sha256 comes from the manifest


def test_a_changed_warm_file_is_copied_again(cold: Path, tmp_path: Path) -> None:
    warm = tmp_path / "warm" / "tiny-model"
    stage(cold, warm)
    (warm / "config.json").write_text('{"layers": 3}')  # same size, other bytes
    report, counter = stage(cold, warm)
    assert (report.kind, report.copied) == ("copied", 1)
    assert counter.under(cold) == []
    assert (warm / "config.json").read_text() == '{"layers": 2}'


def test_a_changed_cold_file_is_hashed_and_copied(cold: Path, tmp_path: Path) -> None:
    warm = tmp_path / "warm" / "tiny-model"
    stage(cold, warm)
    (cold / "config.json").write_text('{"layers": 24, "new": true}')
    (cold / "sub" / "tokenizer.json").unlink()
    report, counter = stage(cold, warm)
    assert (report.kind, report.copied) == ("copied", 1)
    assert counter.under(cold) == []  # another size: copied at once, hashed as it is read
    assert counter.read == [warm / f".config.json.{os.getpid()}.partial"]  # the copy, checked
    assert (warm / "config.json").read_text() == '{"layers": 24, "new": true}'
    assert not (warm / "sub" / "tokenizer.json").exists()  # the engine must not load a stale file
    assert sorted(read_manifest(warm)) == ["config.json", "model-00001.safetensors"]


def test_a_corrupt_manifest_is_ignored(cold: Path, tmp_path: Path) -> None:
    warm = tmp_path / "warm" / "tiny-model"
    stage(cold, warm)
    (warm / MANIFEST).write_text("{not json")
    assert stage(cold, warm)[0].kind == "hashed"
    data = json.loads((warm / MANIFEST).read_text())
    data["files"]["../escape"] = data["files"]["config.json"]
    (warm / MANIFEST).write_text(json.dumps(data))
    assert "../escape" not in read_manifest(warm)


def test_a_copy_that_does_not_match_fails_and_leaves_no_partial_file(cold: Path, tmp_path: Path) -> None:
    warm = tmp_path / "warm" / "tiny-model"

    def lying(path: Path) -> str:
        return "0" * 64

    with pytest.raises(HpcserveError, match="checksum mismatch"):
        stage_weights(cold, warm, hash_file=lying)
    assert not list(warm.rglob("*.partial"))
    assert not (warm / MANIFEST).exists()


def test_staging_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(HpcserveError, match="not a folder"):
        stage_weights(tmp_path / "weights.bin", tmp_path / "warm")


def test_two_stagings_of_one_copy_go_one_after_the_other_and_the_second_reads_nothing(
    cold: Path, tmp_path: Path
) -> None:
    """Two processes on one node (threads here: each opens the lock file, so flock tells them apart) start
    staging the same warm copy at once; the first copies while the second waits, then finds it valid."""
    warm = tmp_path / "warm" / "tiny-model"
    inside = threading.Event()

    def slow(path: Path) -> str:  # the first staging holds the lock a while, mid-copy
        inside.set()
        time.sleep(0.05)
        return sha256_of(path)

    reports: list[StageReport] = []
    first = threading.Thread(target=lambda: reports.append(stage_alone(cold, warm, hash_file=slow)))
    first.start()
    assert inside.wait(10)
    second = stage_alone(cold, warm, hash_file=slow)
    first.join(10)
    assert [r.kind for r in reports] == ["copied"] and second.kind == "warm-valid"
    assert (second.bytes_copied, second.bytes_hashed) == (0, 0)
