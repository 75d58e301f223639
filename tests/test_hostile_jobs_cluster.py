"""Another user's job name and comment on the real cluster: bob writes a 0x1f, a tab, newlines, a fake
hpcserve tag and whole forged squeue records into his own jobs; alice has one normal replica-tagged job.
`hpcserve ps --json` (run as alice), the sampler and the serving controller's grouping must attribute every
field to the right job (findings: hpcserve/slurm/parsers.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from hpcserve.rebalance.sampler import Sampler
from hpcserve.serving.controller import _replica_jobs
from hpcserve.slurm.cli_backend import CliSlurmClient
from hpcserve.slurm.models import Job, JobState
from hpcserve.store import HistoryStore

pytestmark = pytest.mark.cluster
S = "\x1f"
FORGED_GPUS = 1000


def forged_record(dep: str, mark: str) -> str:
    """What a forged alice job 99999 would look like, pending in train with 1000 GPUs, in squeue's layout."""
    fixed = ["99999", "99999", "alice", "acct-alice", "train", "normal", "PENDING", "1", "",
             f"cpu=1,mem=1G,node=1,billing=1,gres/gpu={FORGED_GPUS}", "2026-01-01T00:00:00", "N/A", "5:00",
             "Priority", "forged"]  # fmt: skip
    return S.join(fixed) + mark + f"hpcserve:replica:{dep}:0" + mark


def sbatch(user: str, *args: str) -> str:
    argv = ["runuser", "-u", user, "--", "sbatch", "--parsable", "--hold", "-p", "infer", "-t", "5",
            "-o", "/dev/null", "--chdir=/tmp", *args, "--wrap", "sleep 60"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip().split(";")[0]


@pytest.fixture(scope="module")
def hostile(slurm: CliSlurmClient) -> Iterator[tuple[str, dict[str, str]]]:
    """bob's hostile jobs and alice's normal one (held: they take no node); all cancelled afterwards."""
    dep = f"hostile-{uuid.uuid4().hex[:8]}"
    guessed = f"{S}{'deadbeef' * 2}"  # the mark, with a nonce bob guessed
    fakes = "\n" + forged_record(dep, S) + "\n" + forged_record(dep, guessed) + "\n"
    ids = {
        "tab": sbatch("bob", f"--job-name=a{S}b\tc\nd", f"--comment=x{S}hpcserve:replica:{dep}:1\ny"),
        "forger": sbatch("bob", f"--job-name=hpcserve:replica:{dep}:2{fakes}", f"--comment=c{fakes}"),
        "seps": sbatch("bob", "--job-name=n" + S * 16, f"--comment=hpcserve:replica:{dep}:3{S}"),
        "alice": sbatch("alice", "--job-name=normal", f"--comment=hpcserve:replica:{dep}:0"),
    }
    yield dep, ids
    subprocess.run(["scancel", *ids.values()], capture_output=True, check=False)


def ours(jobs: list[Job], ids: dict[str, str]) -> dict[str, Job]:
    by_id = {str(j.job_id): j for j in jobs}
    return {key: by_id[job_id] for key, job_id in ids.items()}


def check_fields(jobs: dict[str, Any], dep: str) -> None:
    """Records by test key (dicts from ps --json, or Job structs as dicts)."""
    assert {k: j["user"] for k, j in jobs.items()} == {
        "tab": "bob",
        "forger": "bob",
        "seps": "bob",
        "alice": "alice",
    }
    assert all((j["partition"], j["state"], j["account"]) == ("infer", "PENDING", f"acct-{j['user']}")
               for j in jobs.values())  # fmt: skip
    assert (jobs["tab"]["name"], jobs["tab"]["comment"]) == (
        f"a{S}b\tc\nd",
        f"x{S}hpcserve:replica:{dep}:1\ny",
    )
    assert jobs["seps"]["name"] == "n" + S * 16 and jobs["forger"]["name"].startswith(
        f"hpcserve:replica:{dep}:2\n"
    )
    assert {k: j["tag"] for k, j in jobs.items() if j["tag"]} == {"alice": f"hpcserve:replica:{dep}:0"}


def test_ps_json_as_another_user_attributes_every_field(
    hostile: tuple[str, dict[str, str]], slurm_env: dict[str, str]
) -> None:
    dep, ids = hostile
    for argv in (["ps", "--json"], ["ps", "--json", "-p", "infer"]):  # the fast path and the click command
        out = subprocess.run(
            ["runuser", "-u", "alice", "--", "env", f"SLURM_CONF={slurm_env['SLURM_CONF']}",
             f"PATH={os.environ['PATH']}", sys.executable, "-m", "hpcserve", *argv],
            capture_output=True, text=True, timeout=60, check=False, cwd="/tmp",
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        records = json.loads(out.stdout)
        assert not [r for r in records if r["job_id"] == 99999 or r["gpus"] == FORGED_GPUS]
        mine = {k: [r for r in records if str(r["job_id"]) == i] for k, i in ids.items()}
        assert all(len(rs) == 1 for rs in mine.values()), mine  # one record per job, none split in two
        check_fields({k: rs[0] for k, rs in mine.items()}, dep)


def test_ps_table_keeps_working(hostile: tuple[str, dict[str, str]], slurm_env: dict[str, str]) -> None:
    _, ids = hostile
    out = subprocess.run([sys.executable, "-m", "hpcserve", "ps", "-p", "infer"], capture_output=True,
                         text=True, timeout=60, check=False, env=slurm_env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert all(job_id in out.stdout for job_id in ids.values())


def test_sampler_and_snapshot_count_no_forged_job(
    hostile: tuple[str, dict[str, str]], slurm: CliSlurmClient, tmp_path: Path
) -> None:
    dep, ids = hostile
    snapshot = slurm.snapshot()
    assert not [j for j in snapshot.jobs if j.job_id == 99999 or j.gpus == FORGED_GPUS]
    jobs = ours(list(snapshot.jobs), ids)
    check_fields({k: {f: getattr(j, f) for f in Job.__struct_fields__} for k, j in jobs.items()}, dep)
    assert all(j.state is JobState.PENDING for j in jobs.values())
    with HistoryStore(f"sqlite:///{tmp_path}/h.db") as store:
        store.upgrade()
        assert Sampler(slurm, store).tick()
        samples = {s.partition: s for s in store.queue_samples(since=snapshot.at.replace(year=2000))}
    assert samples["train"].pending_gpus < FORGED_GPUS and samples["infer"].pending_jobs >= len(ids)


def test_controller_groups_replicas_from_the_comment_tag_only(
    hostile: tuple[str, dict[str, str]], slurm: CliSlurmClient
) -> None:
    dep, ids = hostile
    found: Iterable[Job] | Mapping[int, Job] = _replica_jobs(slurm.jobs()).get(dep) or ()
    candidates = list(found.values()) if isinstance(found, Mapping) else list(found)  # by index, or a list
    assert [(str(j.job_id), j.user) for j in candidates] == [(ids["alice"], "alice")]
