"""Pinning a pending replica to the node its gentle victims free (``lending: overlap``), on the real
cluster: ``scontrol update JobId=... ReqNodeList=...`` as the service, on a user's held job."""

from __future__ import annotations

import subprocess

import pytest

from hpcserve.errors import ValidationError
from hpcserve.slurm.cli_backend import CliSlurmClient
from hpcserve.slurm.commands import pin_job_argv

pytestmark = pytest.mark.cluster


def test_a_pending_job_of_alices_is_pinned_to_one_node(slurm: CliSlurmClient, submitted: list[str]) -> None:
    argv = ["runuser", "-u", "alice", "--", "sbatch", "--parsable", "--hold", "-p", "infer", "-J", "pin-me",
            "--gres=gpu:1", "-t", "1", "--wrap", "sleep 1"]  # fmt: skip
    job_id = subprocess.run(argv, capture_output=True, text=True, check=True, cwd="/").stdout.strip()
    submitted.append(job_id)
    slurm.pin_job(job_id, ["node6"])
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True)
    assert "ReqNodeList=node6 " in shown.stdout


def test_pin_refuses_what_is_not_a_node_or_a_job() -> None:
    with pytest.raises(ValidationError):
        pin_job_argv("12", ["node5 ExcNodeList=node6"])
    with pytest.raises(ValidationError):
        pin_job_argv("12;x", ["node5"])
    assert pin_job_argv("12", ["node6", "node5"]) == [
        "scontrol",
        "update",
        "JobId=12",
        "ReqNodeList=node[5-6]",
    ]
