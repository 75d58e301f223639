"""``hpcserve doctor`` against a stopped cluster: non-zero exit, one line per failed check with its fix.

This stops the real cluster and starts it again, so it runs last (see conftest.py)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import POLICY, REPO, SITE

pytestmark = [pytest.mark.cluster, pytest.mark.disruptive]
Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def stopped_cluster() -> Iterator[None]:
    script = str(REPO / "scripts" / "minicluster.sh")
    subprocess.run(["bash", script, "stop"], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["bash", script, "start"], check=True, capture_output=True)


@pytest.mark.usefixtures("stopped_cluster")
def test_doctor_fails_with_one_line_per_check_and_its_fix(hpcserve: Cli) -> None:
    out = hpcserve("--site", str(SITE), "--policy", str(POLICY), "doctor")
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    failed = {line.split()[1].rstrip(":"): line for line in lines if line.startswith("FAIL")}
    assert set(failed) == {"slurm", "munge", "accounting", "service"}  # no service runs here either
    slurm_side = [line for name, line in failed.items() if name != "service"]
    assert all("(fix: " in line and "minicluster.sh start" in line for line in slurm_side)
    assert "(fix: " in failed["service"] and "systemctl start hpcserve" in failed["service"]
    assert {line.split()[1].rstrip(":") for line in lines if line.startswith("ok")} == {"config", "database"}
    assert len(lines) == 6 and out.stderr == ""

    as_json = hpcserve("--site", str(SITE), "--policy", str(POLICY), "doctor", "--json")
    assert as_json.returncode == 1
    failing = {c["check"] for c in json.loads(as_json.stdout) if not c["ok"]}
    assert failing == {"slurm", "munge", "accounting", "service"}
