"""GPU telemetry from real Slurm jobs on the local cluster to the real service, as real users.

Templates: alice submits two batch jobs that start the job templates' own telemetry lines (taken from
jobtemplates/batch-inference.sbatch); each job's node loads the recorded NVML device (a libnvidia-ml.so.1 on
the job's LD_LIBRARY_PATH, exported by sbatch) replaying a busy or an idle recording, for the GPUs Slurm gave
it (CUDA_VISIBLE_DEVICES from the GRES). The samples go over the service's Unix socket, where the kernel says
the caller is alice, the Slurm owner of each running job. Then alice sees her jobs' GPU% in the API and in
``hpcserve ps``; bob sees neither, and cannot report samples for alice's job.

Callables: alice submits a Python callable with a GPU (hpcserve.jobs.callables); its job runs it under
``WithTelemetry``, whose reporter thread sends the recorded GPU while the callable runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.api_fixtures import ApiService
from tests.conftest import REPO, wait_until
from tests.nvml_fixtures import BUSY, IDLE, build_recorded_nvml

pytestmark = pytest.mark.cluster
TEMPLATE = REPO / "jobtemplates" / "batch-inference.sbatch"


def telemetry_lines(template: Path) -> str:
    """The template's telemetry block: from its ``# GPU telemetry`` comment to the ``fi`` that ends it."""
    lines = template.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# GPU telemetry"))
    end = lines.index("fi", start)
    return "\n".join(lines[start : end + 1]) + "\n"


def job_script(root: Path) -> Path:
    script = root / "job.sh"
    body = telemetry_lines(TEMPLATE)
    assert "hpcserve telemetry run" in body
    script.write_text(f"#!/bin/bash\nset -euo pipefail\n{body}sleep 45\n")
    script.chmod(0o755)
    return script


def job_env(service: ApiService, recording: Path, library: Path) -> dict[str, str]:
    """A user's environment with hpcserve on PATH and the recorded device (sbatch exports it to the job)."""
    return {**service.user_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "LD_LIBRARY_PATH": str(library), "HPCSERVE_NVML_RECORDING": str(recording),
            "HPCSERVE_TELEMETRY_INTERVAL_S": "1"}  # fmt: skip


def submit_as(service: ApiService, user: str, root: Path, gpus: int, recording: Path, library: Path) -> str:
    argv = ["runuser", "-u", user, "--", "sbatch", "--parsable", f"--gres=gpu:{gpus}", "--time=2",
            "--job-name=telemetry-e2e", f"--output={root}/out/%j.out", str(job_script(root))]  # fmt: skip
    env = job_env(service, recording, library)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd="/", check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def call_as(service: ApiService, user: str, method: str, path: str, body: Any = None) -> Any:
    """``ServiceClient.call`` from a process of ``user``; ``{"status", "error"}`` when refused."""
    code = (
        "import json, sys; from pathlib import Path\n"
        "from hpcserve.service.client import ServiceClient, ServiceError\n"
        "a = json.load(sys.stdin)\n"
        "try: print(json.dumps(ServiceClient(Path(a['socket'])).call(a['method'], a['path'], a['body'])))\n"
        "except ServiceError as e: print(json.dumps({'status': e.status, 'error': str(e)}))\n"
    )
    args = {"socket": str(service.socket), "method": method, "path": path, "body": body}
    argv = ["runuser", "-u", user, "--", sys.executable, "-c", code]
    done = subprocess.run(argv, input=json.dumps(args), env=service.user_env(), capture_output=True,
                          text=True, timeout=60, cwd="/")  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def jobs_seen(service: ApiService, user: str) -> dict[str, dict[str, Any]]:
    rows = call_as(service, user, "GET", "/v1/telemetry/jobs")["jobs"]
    return {row["job_id"]: row for row in rows}


@pytest.fixture
def shared(short_root: Path) -> Path:
    """The recorded NVML library and the recordings, readable by every user; an output folder for jobs."""
    build_recorded_nvml(short_root / "nvml")
    for recording in (BUSY, IDLE):
        shutil.copy(recording, short_root / recording.name)
        (short_root / recording.name).chmod(0o644)
    (short_root / "out").mkdir(mode=0o777)
    (short_root / "out").chmod(0o777)
    return short_root


def test_template_jobs_recorded_gpus_reach_the_service_and_ps(api_service: ApiService, shared: Path) -> None:
    library = shared / "nvml"
    busy = submit_as(api_service, "alice", shared, 2, shared / BUSY.name, library)
    idle = submit_as(api_service, "alice", shared, 1, shared / IDLE.name, library)
    try:
        wait_until(lambda: {busy, idle} <= set(jobs_seen(api_service, "alice")), timeout=60, interval=1)
        seen = jobs_seen(api_service, "alice")
        assert (seen[busy]["user"], seen[busy]["gpus"], seen[idle]["gpus"]) == ("alice", 2, 1)
        assert seen[busy]["util_pct"] >= 87 and seen[idle]["util_pct"] <= 8
        assert seen[busy]["deployment"] is None and seen[busy]["kind"] == "training"
        assert not {busy, idle} & set(jobs_seen(api_service, "bob"))  # bob never sees alice's figures

        ps = api_service.run_as("alice", "ps", "--json")
        assert ps.returncode == 0, ps.stderr
        by_id = {job["id"]: job for job in json.loads(ps.stdout)}
        assert by_id[busy]["gpu_util_pct"] >= 87 and by_id[idle]["gpu_util_pct"] <= 8

        forged = {"job_id": busy, "samples": [{"at": seen[busy]["at"], "gpu_uuid": "GPU-x", "gpu_index": 0,
                  "util_pct": 1.0, "mem_used_bytes": 1, "mem_total_bytes": 2, "power_w": None,
                  "sm_clock_mhz": None}]}  # fmt: skip
        refused = call_as(api_service, "bob", "POST", "/v1/telemetry", forged)
        assert refused["status"] == 403 and "not a running job of bob" in refused["error"]
    finally:
        subprocess.run(["scancel", busy, idle], capture_output=True, timeout=60, check=False)
    logs = "".join(p.read_text(errors="replace") for p in (shared / "out").glob("*.out"))
    assert "cannot report" not in logs and "Traceback" not in logs, logs


CALLABLE = """
import sys, time
from pathlib import Path
from hpcserve.config.policy import JobClassName
from hpcserve.jobs.callables import submit_resolved
from hpcserve.jobs.spec import JobRequest, ResolvedJob
request = JobRequest(job_class=JobClassName.TRAINING, name="telemetry-callable", user="alice",
                     gpus_per_node=1)
job = ResolvedJob(request=request, partition="train", qos="normal", time_s=120, preemptible=False,
                  grace_s=0, tag="hpcserve:test:telemetry", env={})
print(submit_resolved(job, time.sleep, 20, folder=Path(sys.argv[1]) / "%j").job_id)
"""


def test_a_callables_recorded_gpu_reaches_the_service(api_service: ApiService, shared: Path) -> None:
    argv = ["runuser", "-u", "alice", "--", sys.executable, "-c", CALLABLE, str(shared / "out")]
    env = job_env(api_service, shared / IDLE.name, shared / "nvml")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd="/", check=False)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    try:
        wait_until(lambda: job_id in jobs_seen(api_service, "alice"), timeout=60, interval=1)
        row = jobs_seen(api_service, "alice")[job_id]
        assert (row["user"], row["gpus"], row["deployment"]) == ("alice", 1, None)
        assert row["util_pct"] <= 8
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=60, check=False)
