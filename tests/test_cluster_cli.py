"""The read-side CLI and the CLI backend against the real local Slurm 22.05 cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hpcserve.errors import SlurmCommandError
from hpcserve.slurm.cli_backend import CliSlurmClient
from hpcserve.slurm.models import JobState
from hpcserve.slurm.protocol import JobFilter
from tests.api_fixtures import ApiService
from tests.conftest import POLICY, SITE, wait_until

pytestmark = pytest.mark.cluster
Cli = Callable[..., subprocess.CompletedProcess[str]]

TWO_NODE_SCRIPT = """#!/bin/bash
srun bash -c 'echo "task=$SLURM_PROCID host=$(hostname) gpus=$CUDA_VISIBLE_DEVICES"'
sleep 300
"""


def ps_json(hpcserve: Cli, *args: str) -> list[dict[str, Any]]:
    out = hpcserve("ps", "--json", *args)
    assert out.returncode == 0, out.stderr
    jobs: list[dict[str, Any]] = json.loads(out.stdout)
    return jobs


def submit_two_node_job(slurm: CliSlurmClient, job_dir: Path, submitted: list[str]) -> str:
    job_id = slurm.submit(
        TWO_NODE_SCRIPT,
        ["-p", "train", "-N", "2", "--ntasks-per-node=1", "--gres=gpu:2", "-t", "10", "-J", "pytest two-node",
         "--comment=hpcserve:test:two-node", f"--output={job_dir}/%j.out", f"--chdir={job_dir}"],
    )  # fmt: skip
    submitted.append(job_id)
    return job_id


def test_two_node_gpu_job_shows_in_ps_with_nodes_and_gpus(
    slurm: CliSlurmClient, hpcserve: Cli, job_dir: Path, submitted: list[str]
) -> None:
    job_id = submit_two_node_job(slurm, job_dir, submitted)
    out_file = job_dir / f"{job_id}.out"
    wait_until(lambda: out_file.exists() and out_file.read_text().count("task=") == 2)
    (job,) = ps_json(hpcserve, "-j", job_id)
    assert job["state"] == "RUNNING" and job["num_nodes"] == 2 and len(job["nodes"]) == 2
    assert job["gpus"] == 4 and job["tag"] == "hpcserve:test:two-node" and job["partition"] == "train"
    assert job["wait_s"] is not None and job["wait_s"] >= 0
    # the tasks ran on exactly the two nodes Slurm allocated (each node has its own hostname), and each
    # got its two GRES GPUs in CUDA_VISIBLE_DEVICES
    lines = out_file.read_text().splitlines()
    assert sorted(ln.split()[1] for ln in lines) == [f"host={n}" for n in sorted(job["nodes"])]
    assert all(ln.endswith("gpus=0,1") for ln in lines)

    # unfiltered `ps --json` takes the path where squeue starts before the CLI loads
    assert job_id in {str(j["job_id"]) for j in ps_json(hpcserve)}

    table = hpcserve("ps", "--me")
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if job_id in line)
    assert "RUNNING" in row and "hpcserve:test:two-node" in row and "node[" in row


def test_cancel_ends_a_job(slurm: CliSlurmClient, hpcserve: Cli, job_dir: Path, submitted: list[str]) -> None:
    job_id = submit_two_node_job(slurm, job_dir, submitted)
    wait_until(lambda: [j.state for j in slurm.jobs(JobFilter(job_ids=(job_id,)))] == [JobState.RUNNING])
    out = hpcserve("cancel", "--json", job_id)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"job_ids": [job_id], "action": "cancelled"}
    wait_until(lambda: all(j.state.is_terminal for j in slurm.jobs(JobFilter(job_ids=(job_id,)))))
    # slurmdbd lags ~0.5 s behind slurmctld
    wait_until(lambda: [r.state for r in slurm.accounting([job_id])] == [JobState.CANCELLED])


def test_cancel_rejects_bad_ids_and_cancels_nothing(
    slurm: CliSlurmClient, hpcserve: Cli, submitted: list[str]
) -> None:
    job_id = slurm.submit("#!/bin/bash\nsleep 60\n", ["-H", "-p", "infer", "-t", "1", "-o", "/dev/null"])
    submitted.append(job_id)
    out = hpcserve("cancel", job_id, "--", "-u")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "'-u' is not a Slurm job id" in out.stderr
    assert [j.state for j in slurm.jobs(JobFilter(job_ids=(job_id,)))] == [JobState.PENDING]


def test_nodes_shows_eight_nodes_with_four_gpus_under_two_switches(hpcserve: Cli) -> None:
    out = hpcserve("--site", str(SITE), "nodes", "--json")
    assert out.returncode == 0, out.stderr
    nodes = json.loads(out.stdout)
    assert sorted(n["name"] for n in nodes) == [f"node{i}" for i in range(1, 9)]
    assert {n["gpus_total"] for n in nodes} == {4}
    by_switch = {sw: sorted(n["name"] for n in nodes if n["switch"] == sw) for sw in ("leaf1", "leaf2")}
    assert by_switch == {
        "leaf1": [f"node{i}" for i in range(1, 5)],
        "leaf2": [f"node{i}" for i in range(5, 9)],
    }
    assert {n["fabric"] for n in nodes if n["switch"] == "leaf1"} == {"ib"}
    assert {n["fabric"] for n in nodes if n["switch"] == "leaf2"} == {"roce"}
    table = hpcserve("--site", str(SITE), "nodes", "-p", "infer")
    assert table.returncode == 0 and "4 nodes" in table.stdout and "leaf2" in table.stdout


def test_snapshot_matches_site_config(slurm: CliSlurmClient) -> None:
    from hpcserve.config import load_site_config

    site = load_site_config(SITE)
    snap = slurm.snapshot()
    parts = {p.name: set(p.nodes) for p in snap.partitions}
    assert {spec.name: set(spec.nodes) for spec in site.partitions.by_role().values()} == parts
    assert {n.name: n.switch for n in snap.nodes} == {n: site.leaf_of(n) for n in site.all_nodes()}


def test_submit_quotes_values_and_reports_slurm_errors(slurm: CliSlurmClient, submitted: list[str]) -> None:
    name = 'it\'s a "quoted" $(name); rm -rf /'
    job_id = slurm.submit(
        "#!/bin/bash\ntrue\n", ["-H", "-p", "infer", "-t", "1", "-J", name, "-o", "/dev/null"]
    )
    submitted.append(job_id)
    (job,) = slurm.jobs(JobFilter(job_ids=(job_id,)))
    assert job.name == name
    with pytest.raises(SlurmCommandError) as err:
        slurm.submit("#!/bin/bash\ntrue\n", ["-p", "no-such-partition", "-t", "1"])
    assert err.value.returncode == 1 and err.value.argv[0] == "sbatch"
    assert "invalid partition" in err.value.stderr.lower()


def test_jobs_for_unknown_id_is_empty(slurm: CliSlurmClient, hpcserve: Cli) -> None:
    assert slurm.jobs(JobFilter(job_ids=("1",))) == []
    assert ps_json(hpcserve, "-j", "1") == []


def test_doctor_passes_on_a_running_cluster(hpcserve: Cli, api_service: ApiService) -> None:
    env = {"HPCSERVE_SOCKET": str(api_service.socket)}
    out = hpcserve("--site", str(SITE), "--policy", str(POLICY), "doctor", "--json", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    checks = {c["check"]: c["ok"] for c in json.loads(out.stdout)}
    assert checks == {"slurm": True, "munge": True, "accounting": True, "config": True, "lending": True,
                      "service": True, "database": True}  # fmt: skip
    down = hpcserve(
        "--site", str(SITE), "--policy", str(POLICY), "doctor", env={"HPCSERVE_SOCKET": "/nonexistent"}
    )
    assert down.returncode == 1 and "FAIL  service: cannot reach the hpcserve service" in down.stdout


def test_unknown_job_or_user_is_an_error_not_silence(hpcserve: Cli) -> None:
    # Slurm exits 0 for both; hpcserve reports them as one-line errors
    cancel = hpcserve("cancel", "1")
    assert cancel.returncode == 1 and cancel.stdout == ""
    assert cancel.stderr.count("\n") == 1 and "Invalid job id specified" in cancel.stderr
    ps = hpcserve("ps", "-u", "no-such-user-hpcserve")
    assert ps.returncode == 1 and "Invalid user: no-such-user-hpcserve" in ps.stderr


def test_fast_ps_json_matches_the_click_command(
    slurm: CliSlurmClient, slurm_env: dict[str, str], submitted: list[str]
) -> None:
    """Exactly `hpcserve ps --json` skips click (hpcserve/cli/fast_ps.py); it must print what the click
    command prints."""
    variants = [("fast ps", ["--comment=hpcserve:test:fast"]), ("arr", ["--array=0-2"])]
    ids = [slurm.submit("#!/bin/bash\ntrue\n", ["--hold", "-p", "all", "-t", "5", "-J", name, *extra])
           for name, extra in variants]  # fmt: skip
    submitted.extend(ids)

    def ours(argv: list[str]) -> dict[str, dict[str, Any]]:
        out = subprocess.run(argv, capture_output=True, text=True, env=slurm_env, timeout=60, check=True)
        return {j["id"]: {**j, "wait_s": None} for j in json.loads(out.stdout) if str(j["job_id"]) in ids}

    fast = ours([sys.executable, "-m", "hpcserve", "ps", "--json"])
    click_path = ours([sys.executable, "-c", "from hpcserve.cli.main import main; main(['ps', '--json'])"])
    assert fast == click_path and len(fast) >= 2
