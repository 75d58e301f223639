"""``hpcserve doctor`` against the real local cluster: its slurm.conf (today's layout, lending by node moves)
passes the shipped site config, and a site config that declares lending through preemption (overlap) is a
deliberate mismatch the doctor names line by line, with each fix. slurm.conf itself is not touched."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from hpcserve.slurm.cli_backend import CliSlurmClient
from tests.conftest import POLICY, SITE
from tests.test_config import OVERLAP, edited

pytestmark = pytest.mark.cluster

Run = Callable[..., subprocess.CompletedProcess[str]]
RECONF = "in slurm.conf, then scontrol reconfigure"


def lending_checks(hpcserve: Run, site: Path) -> list[dict[str, object]]:
    out = hpcserve("--site", str(site), "--policy", str(POLICY), "doctor", "--json")
    assert out.stdout, out.stderr
    return [c for c in json.loads(out.stdout) if c["check"] == "lending"]


def test_shipped_site_config_agrees_with_the_live_cluster(slurm: CliSlurmClient, hpcserve: Run) -> None:
    out = hpcserve("--site", str(SITE), "--policy", str(POLICY), "doctor")
    lending = [line for line in out.stdout.splitlines() if "lending:" in line]
    want = "ok    lending: mode moves: managed pool node[3-6] in train/infer as declared"
    assert lending == [want], out.stdout


def test_doctor_names_each_overlap_mismatch_with_its_fix(
    slurm: CliSlurmClient, hpcserve: Run, tmp_path: Path
) -> None:
    out = hpcserve("--site", str(edited(SITE, tmp_path, OVERLAP)), "--policy", str(POLICY), "doctor")
    assert out.returncode == 1
    lines = [line for line in out.stdout.splitlines() if "lending:" in line]
    assert lines, out.stdout
    assert all(line.startswith("FAIL  lending: ") and "(fix: " in line for line in lines)
    assert (
        "FAIL  lending: partition infer has PriorityTier=10, not above train's 10 "
        f"(fix: PriorityTier=20 on PartitionName=infer {RECONF})"
    ) in lines
    assert (
        "FAIL  lending: partition train has GraceTime=0, not lending.grace_time_s (120) "
        f"(fix: GraceTime=120 on PartitionName=train {RECONF})"
    ) in lines
    assert any("lacks" in line and "of lending.shared_nodes" in line for line in lines)


def test_doctor_names_preempt_type_and_qos_mismatches(
    slurm: CliSlurmClient, hpcserve: Run, tmp_path: Path
) -> None:
    qos = {"mode": "overlap", "shared_nodes": "node[3-6]", "preempt": "qos",
           "training_qos": "hpc-train", "inference_qos": "hpc-infer"}  # fmt: skip
    checks = lending_checks(hpcserve, edited(SITE, tmp_path, {**OVERLAP, "lending": qos}))
    assert [(c["ok"], c["detail"], c["fix"]) for c in checks[:3]] == [
        (False, "PreemptType is preempt/partition_prio, not preempt/qos",
         "PreemptType=preempt/qos in slurm.conf, then restart slurmctld"),
        (False, "QOS hpc-train is not in slurmdbd", "sacctmgr add qos hpc-train"),
        (False, "QOS hpc-infer is not in slurmdbd", "sacctmgr add qos hpc-infer"),
    ]  # fmt: skip
    assert all("lacks" in str(c["detail"]) for c in checks[3:])  # the shared nodes, as in the test above
