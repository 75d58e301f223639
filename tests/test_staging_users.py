"""A warm copy another user could have written is never served: staging run as alice (``runuser``, as her
replica runs) in a shared warm tier (1777, as a site's node-local scratch is) where bob got there first.

- bob plants a folder under alice's copy's name, with his own weights and a manifest forged to match the
  cold files' sizes and mtimes: alice's staging refuses in one line and serves nothing from it;
- alice's own copy, once others may write to it, with bob's file swapped in: set aside and copied again;
- bob's lock file beside alice's copy (so he could hold it forever): refused in one line;
- with ``{user}`` in the warm tier, alice and bob each stage the same model into a folder of their own,
  and without it their copies sit side by side in folders whoever came first made (shared, sticky);
and which entries count as untrusted (as root, with ``os.chown``)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcserve.serving.staging import read_manifest, sha256_of, stage_weights, untrusted_entry
from tests.conftest import write_weights

FILES = {"config.json": 64, "model.safetensors": 64 << 10}
STAGE = (
    "import sys; from pathlib import Path; from hpcserve.serving.staging import hold_warm_copy, stage_alone\n"
    "dst = Path(sys.argv[2]); hold_warm_copy(dst); print(stage_alone(Path(sys.argv[1]), dst).kind)"
)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A cold tier everyone reads and a warm tier everyone may write to (sticky, as /tmp)."""
    root = Path(tempfile.mkdtemp(prefix="hpcserve-warm-", dir="/tmp"))
    root.chmod(0o755)
    write_weights(root / "cold" / "tiny", FILES)
    for path in (root / "cold", *(root / "cold").rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    (root / "warm").mkdir()
    (root / "warm").chmod(0o1777)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def as_user(user: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", user, "--", *argv], capture_output=True, text=True, timeout=60,
                          check=False, cwd="/")  # fmt: skip


def stage_as(user: str, root: Path) -> subprocess.CompletedProcess[str]:
    return as_user(
        user, sys.executable, "-c", STAGE, str(root / "cold" / "tiny"), str(root / "warm" / "tiny")
    )


def as_bob_python(script: str, *args: str) -> None:
    out = as_user("bob", sys.executable, "-c", script, *args)
    assert out.returncode == 0, out.stderr


FORGE = """import hashlib, json, sys
from pathlib import Path
cold, p = Path(sys.argv[1]), Path(sys.argv[2])
p.mkdir(mode=0o777)
p.chmod(0o777)
files = {}
for f in sorted(cold.iterdir()):
    c = f.stat()
    (p / f.name).write_bytes(b"bob's weights".ljust(c.st_size, b"!"))
    w = (p / f.name).stat()
    files[f.name] = {"size": c.st_size, "mtime_ns": c.st_mtime_ns, "warm_mtime_ns": w.st_mtime_ns,
                     "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
(p / ".hpcserve-manifest.json").write_text(json.dumps({"version": 1, "files": files}))
"""


def test_bobs_folder_under_alices_copys_name_is_refused_and_never_served(shared: Path) -> None:
    planted = shared / "warm" / "tiny"
    as_bob_python(FORGE, str(shared / "cold" / "tiny"), str(planted))  # his weights, a matching manifest
    assert read_manifest(planted)  # the forgery reads as a good manifest
    staged = stage_as("alice", shared)
    assert staged.returncode != 0 and "another user's or writable by others" in staged.stderr, staged.stderr
    assert "--warm-tier" in staged.stderr
    assert planted.stat().st_uid == pwd.getpwnam("bob").pw_uid  # left as it is: alice cannot move it


SWAP = """import json, os, sys
from pathlib import Path
copy, rel = Path(sys.argv[1]), "model.safetensors"
entry = json.loads((copy / ".hpcserve-manifest.json").read_text())["files"][rel]
poison = copy / (rel + ".b")
poison.write_bytes(b"poison".ljust(entry["size"], b"!"))
os.utime(poison, ns=(entry["warm_mtime_ns"], entry["warm_mtime_ns"]))
poison.replace(copy / rel)
"""


def test_alices_copy_that_others_could_write_is_set_aside_and_copied_again(shared: Path) -> None:
    first = stage_as("alice", shared)
    assert (first.returncode, first.stdout.strip()) == (0, "copied"), first.stderr
    assert stage_as("alice", shared).stdout.strip() == "warm-valid"
    copy = shared / "warm" / "tiny"
    assert all(p.stat().st_mode & 0o022 == 0 for p in (copy, *copy.rglob("*")))  # whatever the umask
    copy.chmod(0o777)  # a mistake of alice's: now bob may swap a file in
    weights = copy / "model.safetensors"
    as_bob_python(SWAP, str(copy))  # same size, same mtime as the manifest says: stat alone cannot tell
    assert weights.read_bytes().startswith(b"poison") and read_manifest(copy)
    again = stage_as("alice", shared)
    assert (again.returncode, again.stdout.strip()) == (0, "copied"), again.stderr
    assert weights.stat().st_uid == pwd.getpwnam("alice").pw_uid
    assert sha256_of(weights) == sha256_of(shared / "cold" / "tiny" / "model.safetensors")


def test_bobs_lock_file_beside_alices_copy_is_refused(shared: Path) -> None:
    lock = shared / "warm" / ".tiny.hpcserve-lock"
    out = as_user("bob", "sh", "-c", f"touch {lock} && chmod 666 {lock}")
    assert out.returncode == 0, out.stderr
    staged = stage_as("alice", shared)
    assert staged.returncode != 0 and "the lock file is another user's" in staged.stderr, staged.stderr
    assert not (shared / "warm" / "tiny").exists()


def test_as_root_an_entry_of_another_owner_or_writable_by_others_is_untrusted(tmp_path: Path) -> None:
    cold, warm = tmp_path / "cold", tmp_path / "warm"
    write_weights(cold, FILES)
    assert stage_weights(cold, warm).kind == "copied" and untrusted_entry(warm) is None
    forged = warm / "model.safetensors"
    os.chown(forged, pwd.getpwnam("bob").pw_uid, -1)
    assert untrusted_entry(warm) == forged
    assert stage_weights(cold, warm).kind == "copied"  # set aside, copied again
    assert untrusted_entry(warm) is None and forged.stat().st_uid == os.geteuid()
    (warm / "sub").mkdir(mode=0o777)
    (warm / "sub").chmod(0o777)
    assert untrusted_entry(warm) == warm / "sub"
    (warm / "sub").rmdir()
    (warm / "link").symlink_to(cold)
    assert untrusted_entry(warm) == warm / "link"


SERVE_STAGE = """import sys
from hpcserve.serving.spec import DeploymentSpec
from hpcserve.serving.start_probe import stage
spec = DeploymentSpec.model_validate({"name": "tiny", "model": sys.argv[1], "warm_tier": sys.argv[2]})
staged, staging = stage(spec)
print(staged.model, staging.kind)
"""


def test_with_user_in_the_warm_tier_each_user_stages_a_copy_of_their_own(shared: Path) -> None:
    template = str(shared / "warm" / "{node}" / "{user}")
    node = os.uname().nodename
    for user in ("alice", "bob", "alice"):
        out = as_user(user, sys.executable, "-c", SERVE_STAGE, str(shared / "cold" / "tiny"), template)
        assert out.returncode == 0, out.stderr
        model, kind = out.stdout.split()
        assert model == str(shared / "warm" / node / user / "tiny")
        assert Path(model).stat().st_uid == pwd.getpwnam(user).pw_uid
    assert kind == "warm-valid"  # alice's second start: her own copy, untouched by bob's
    assert (shared / "warm" / node).stat().st_mode & 0o7777 == 0o1777  # made by alice, shared by all
    assert (shared / "warm" / node / "bob").stat().st_mode & 0o7777 == 0o755  # bob's alone


def test_without_user_the_folders_above_the_copies_are_shared_by_whoever_made_them(shared: Path) -> None:
    """alice's replica makes the node's folder; bob's, a moment later, still stages his model beside hers."""
    write_weights(shared / "cold" / "other", FILES)
    for path in (shared / "cold" / "other", *(shared / "cold" / "other").rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    template = str(shared / "warm" / "{node}" / "models")
    for user, model in (("alice", "tiny"), ("bob", "other")):
        out = as_user(user, sys.executable, "-c", SERVE_STAGE, str(shared / "cold" / model), template)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[1] == "copied"
