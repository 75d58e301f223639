"""The training side through the real ``hpcserve`` CLI on the real cluster: placement on one leaf with its
fabric's NCCL env, policy refusals that leave Slurm untouched, inert hostile values, callables, the probe."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from hpcserve.config import load_site_config
from hpcserve.slurm.cli_backend import CliSlurmClient
from hpcserve.slurm.models import JobState
from hpcserve.slurm.protocol import JobFilter
from tests.conftest import POLICY, SITE, wait_until

pytestmark = pytest.mark.cluster
Run = Callable[..., subprocess.CompletedProcess[str]]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def cli(hpcserve: Run, tmp_path: Path) -> Run:
    """``hpcserve`` with the local site and policy, the venv first on PATH (sbatch exports it to the job),
    and a probe verdict file of its own."""
    env = {"HPCSERVE_SITE": str(SITE), "HPCSERVE_POLICY": str(POLICY),
           "HPCSERVE_PROBE_FILE": str(tmp_path / "probe.json"),
           "PATH": f"{VENV_BIN}:/usr/bin:/bin"}  # fmt: skip

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return hpcserve(*args, env=env)

    return run


def submit_json(cli: Run, *args: str) -> dict[str, object]:
    out = cli("submit", *args, "--json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def wait_done(slurm: CliSlurmClient, job_id: str, timeout: float = 180.0) -> JobState:
    state: list[JobState] = []

    def done() -> bool:
        records = slurm.accounting([job_id])
        state[:] = [r.state for r in records]
        return bool(records) and all(s.is_terminal for s in state)

    wait_until(done, timeout=timeout, interval=0.5)
    return state[0]


def test_two_node_torchrun_runs_on_one_leaf_with_its_fabric_env(
    cli: Run, slurm: CliSlurmClient, job_dir: Path, submitted: list[str]
) -> None:
    got = submit_json(cli, "train-torchrun", "-N", "2", "--set", "STEPS=3", "--set", "STEP_SECONDS=0",
                      "-o", f"{job_dir}/%j.out", "-t", "10")  # fmt: skip
    job_id = str(got["job_id"])
    submitted.append(job_id)
    assert wait_done(slurm, job_id) == JobState.COMPLETED, (job_dir / f"{job_id}.out").read_text()
    out = (job_dir / f"{job_id}.out").read_text()
    assert "rank 0 done" in out and "rank 1 done" in out, out
    envs = dict(re.findall(r"^rank=(\d) host=(\S+ env .*)$", out, re.MULTILINE))
    hosts = {line.split()[0] for line in envs.values()}
    site = load_site_config(SITE)
    assert len(hosts) == 2 and len({site.leaf_of(h) for h in hosts}) == 1, out
    fabric_name, fabric = site.fabric_of(hosts.pop()) or ("", None)
    assert fabric is not None
    for line in envs.values():
        assert (
            f"HPCSERVE_FABRIC={fabric_name}" in line and f"NCCL_SOCKET_IFNAME={fabric.socket_ifname}" in line
        )
        assert f"NCCL_IB_HCA=={','.join(fabric.hcas)}" in line


@pytest.mark.parametrize(
    ("flags", "rule"),
    [
        (
            ["-N", "4", "--gpus-per-node", "4", "--class", "interactive"],
            "classes.interactive.max_gpus_per_job",
        ),
        (["-p", "infer"], "classes.training.partition"),
        (["-t", "3-00:00:01"], "classes.training.max_time"),
        (["-t", "UNLIMITED"], "UNLIMITED is never submitted"),
    ],
)
def test_policy_violations_never_reach_slurm(
    cli: Run, slurm: CliSlurmClient, flags: list[str], rule: str
) -> None:
    name = f"refused-{uuid.uuid4().hex[:8]}"
    out = cli("submit", "train-torchrun", "-J", name, *flags)
    assert out.returncode == 2 and rule in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert not [j for j in slurm.jobs(JobFilter()) if j.name == name]


def test_hostile_parameter_and_name_are_inert(
    cli: Run, slurm: CliSlurmClient, job_dir: Path, submitted: list[str]
) -> None:
    marker = job_dir / "pwned"
    name = f"x; touch {marker}; $(touch {marker}) `touch {marker}` \"q\" 'q' \\"
    hostile = f"{name}\ntouch {marker}"
    got = submit_json(cli, "train-torchrun", "-N", "1", "-J", name, "--set", f"RUN_NAME={hostile}",
                      "--set", "STEPS=1", "--set", "STEP_SECONDS=0", "-o", f"{job_dir}/%j.out",
                      "-t", "5")  # fmt: skip
    job_id = str(got["job_id"])
    submitted.append(job_id)
    assert wait_done(slurm, job_id) == JobState.COMPLETED, (job_dir / f"{job_id}.out").read_text()
    assert not marker.exists()
    assert f"rank=0 run_name={json.dumps(hostile)}" in (job_dir / f"{job_id}.out").read_text()

    # The name reached Slurm as text, not as a command (slurmdbd itself stores " as `). Right after a job
    # ends, slurmdbd may show its row as "allocation" for a moment (shared/minicluster/REPORT.md).
    def names() -> list[str]:
        return [r.name for r in slurm.accounting([job_id])]

    wait_until(lambda: names() != ["allocation"], timeout=30)
    assert names() == [name.replace('"', "`")]
    refused = cli("submit", "train-torchrun", "-J", hostile)  # a newline would forge a line in squeue
    assert refused.returncode == 2 and "-J/--job-name" in refused.stderr and not marker.exists()


def test_train_runs_a_callable_and_prints_its_result(cli: Run, job_dir: Path) -> None:
    out = cli("train", "tests.jobs_fixtures:add", "2", "3", "--class", "batch", "-t", "5",
              "--folder", str(job_dir), "--wait", "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["results"] == ["23"]  # CLI arguments arrive as strings


def test_probe_verdict_keeps_a_degraded_node_out(cli: Run, tmp_path: Path) -> None:
    probe_out = tmp_path / "probe.out"
    probe_out.write_text("".join(f"node=node{i} ranks={i} p2p_min={bw}GB/s busbw_mean=1.0GB/s\n"
                                 for i, bw in [(1, 2.0), (2, 0.1), (3, 2.1), (4, 1.9)]))  # fmt: skip
    recorded = cli("probe", str(probe_out), "--json")
    assert recorded.returncode == 0 and json.loads(recorded.stdout)["degraded"] == ["node2"], recorded.stderr
    rendered = cli("render", "train-torchrun", "-N", "3", "--json")
    assert rendered.returncode == 0, rendered.stderr
    assert json.loads(rendered.stdout)["nodes"] == ["node1", "node3", "node4"]
