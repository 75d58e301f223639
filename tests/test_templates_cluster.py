"""The shipped templates on the real local cluster: each runs under plain ``sbatch jobtemplates/NAME.sbatch``,
and a rendered script carries hostile values into the job literally, running none of them."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path

import pytest

from hpcserve.jobs.templates import load_template, render
from hpcserve.slurm.cli_backend import CliSlurmClient
from hpcserve.slurm.models import AccountingRecord, JobState
from tests.conftest import REPO, wait_until

pytestmark = pytest.mark.cluster
TEMPLATES = REPO / "jobtemplates"
VENV_BIN = Path(sys.executable).parent
TORCH_JOB_S = 180.0  # two nodes importing torch on a 2-core machine, plus queueing behind other tests


def job_env(slurm_env: Mapping[str, str], name: str, **params: str) -> dict[str, str]:
    """The caller's environment as sbatch exports it: the venv first on PATH, no stray template parameters."""
    names = {p.name for p in load_template(name, TEMPLATES).params}
    env = {k: v for k, v in slurm_env.items() if k not in names}
    return {**env, "PATH": f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}", **params}


def sbatch(args: list[str], env: Mapping[str, str], cwd: Path, script: str | None = None) -> str:
    out = subprocess.run(["sbatch", "--parsable", "--time=5", *args], input=script, capture_output=True,
                         text=True, env=dict(env), cwd=cwd, timeout=30, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def submit_template(
    name: str, job_dir: Path, env: Mapping[str, str], submitted: list[str], *args: str
) -> str:
    output = "%x-%A_%a.out" if name == "batch-inference" else "%x-%j.out"
    job_id = sbatch([f"--output={job_dir}/{output}", *args, str(TEMPLATES / f"{name}.sbatch")], env, job_dir)
    submitted.append(job_id)
    return job_id


def finished(
    slurm: CliSlurmClient, job_id: str, count: int = 1, timeout: float = 60.0
) -> list[AccountingRecord]:
    """The job's sacct records (one per array task) once all ``count`` of them are terminal."""
    records: list[AccountingRecord] = []

    def done() -> bool:
        nonlocal records
        records = slurm.accounting([job_id])
        return len(records) == count and all(r.state.is_terminal for r in records)

    wait_until(done, timeout=timeout, interval=0.5)
    return sorted(records, key=lambda r: r.job_id)


def assert_completed(records: list[AccountingRecord], job_dir: Path) -> None:
    logs = "\n".join(p.read_text(errors="replace") for p in sorted(job_dir.glob("*.out")))
    assert all(r.state == JobState.COMPLETED for r in records), (
        f"{[(r.job_id, r.state) for r in records]}\n{logs}"
    )


def output_of(job_dir: Path, name: str, job_id: str) -> str:
    return (job_dir / f"{name}-{job_id}.out").read_text(errors="replace")


# ------------------------------------------------------------------------------------------ train-torchrun
def test_train_torchrun_defaults_two_ranks_allreduce(
    slurm: CliSlurmClient, slurm_env: dict[str, str], job_dir: Path, submitted: list[str]
) -> None:
    job_id = submit_template("train-torchrun", job_dir, job_env(slurm_env, "train-torchrun"), submitted)
    assert_completed(finished(slurm, job_id, timeout=TORCH_JOB_S), job_dir)
    out = output_of(job_dir, "train-torchrun", job_id)
    ranks = re.findall(r"^rank=(\d) world=2 host=(\S+) allreduce=OK loss=[0-9.]+$", out, re.MULTILINE)
    assert sorted(r for r, _ in ranks) == ["0", "1"], out
    assert len({host for _, host in ranks}) == 2, "the two ranks ran on two nodes"
    assert "rank 0 done" in out and "rank 1 done" in out
    assert "rank=0 step=5 " in out and "torchrun finished with status 0" in out


def test_train_torchrun_usr2_checkpoints_then_requeues(
    slurm: CliSlurmClient, slurm_env: dict[str, str], job_dir: Path, submitted: list[str]
) -> None:
    env = job_env(slurm_env, "train-torchrun", STEPS="600", CKPT_DIR=str(job_dir / "ckpt"))
    job_id = submit_template("train-torchrun", job_dir, env, submitted)
    log = job_dir / f"train-torchrun-{job_id}.out"
    wait_until(lambda: log.exists() and "rank=0 step=2 " in log.read_text(), timeout=TORCH_JOB_S)

    subprocess.run(["scancel", "--batch", "--signal=USR2", job_id], check=True, timeout=30)
    wait_until(lambda: requeued(scontrol_job(job_id)), timeout=60)
    out = log.read_text()
    assert "USR2 received" in out and "rank=0 got USR2" in out and "rank=1 got USR2" in out, out
    assert "rank=0 checkpoint saved at step" in out and (job_dir / "ckpt" / "demo.pt").exists()


def requeued(job: str) -> bool:
    """Back in the queue after one restart (it shows COMPLETING with Restarts=1 while its steps end)."""
    return "Restarts=1" in job and re.search(r"JobState=(PENDING|REQUEUED) ", job) is not None


def scontrol_job(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                          timeout=30, check=False).stdout  # fmt: skip


HOSTILE = "run; touch {x}; $(touch {x}) `touch {x}` \"dq\" 'sq' \\back\\slash\n#SBATCH --partition=infer\nend"


def test_rendered_script_carries_hostile_values_and_fabric_env_literally(
    slurm: CliSlurmClient, slurm_env: dict[str, str], job_dir: Path, submitted: list[str]
) -> None:
    marker = job_dir / f"pwned-{uuid.uuid4().hex[:6]}"
    run_name = HOSTILE.format(x=marker)
    fabric = {"NCCL_IB_HCA": "mlx5_0,mlx5_1", "NCCL_SOCKET_IFNAME": "eth0", "HPCSERVE_FABRIC": "ib",
              "HPCSERVE_NOTE": f"$(touch {marker})`touch {marker}`;x"}  # fmt: skip
    values = {"RUN_NAME": run_name, "STEPS": "1", "STEP_SECONDS": "0"}
    script = render(load_template("train-torchrun", TEMPLATES), values, fabric)

    env = job_env(slurm_env, "train-torchrun")
    job_id = sbatch([f"--output={job_dir}/%j.out", f"--chdir={job_dir}"], env, job_dir, script=script)
    submitted.append(job_id)
    records = finished(slurm, job_id, timeout=TORCH_JOB_S)
    assert_completed(records, job_dir)
    assert records[0].partition == "train", "a value smuggled an #SBATCH line"

    out = (job_dir / f"{job_id}.out").read_text()
    assert not marker.exists()
    assert f"hpcserve: run_name={run_name}\n" in out
    for rank in (0, 1):
        assert f"rank={rank} run_name={json.dumps(run_name)}\n" in out
        env_line = next(ln for ln in out.splitlines() if ln.startswith(f"rank={rank} host="))
        expected = " ".join(f"{k}={v}" for k, v in sorted(fabric.items()))
        assert env_line.endswith(f" env {expected}"), env_line


# ------------------------------------------------------------------------------------------ nccl-probe
def test_nccl_probe_prints_busbw_per_size_and_a_line_per_node(
    slurm: CliSlurmClient, slurm_env: dict[str, str], job_dir: Path, submitted: list[str]
) -> None:
    job_id = submit_template("nccl-probe", job_dir, job_env(slurm_env, "nccl-probe"), submitted)
    assert_completed(finished(slurm, job_id, timeout=TORCH_JOB_S), job_dir)
    out = output_of(job_dir, "nccl-probe", job_id)
    sizes = re.findall(r"^size=(\d+) op=all_reduce backend=gloo .* ranks=2 .*algbw=([0-9.]+)GB/s "
                       r"busbw=([0-9.]+)GB/s$", out, re.MULTILINE)  # fmt: skip
    assert [int(s) for s, _, _ in sizes] == [64 * 1024, 1024 * 1024, 8 * 1024 * 1024], out
    assert all(float(bus) == pytest.approx(float(alg) * 2 * (2 - 1) / 2, abs=1e-3) for _, alg, bus in sizes)
    nodes = re.findall(
        r"^node=(node\d) ranks=\d p2p_min=[0-9.]+GB/s busbw_mean=[0-9.]+GB/s", out, re.MULTILINE
    )
    assert len(set(nodes)) == 2, out


# ------------------------------------------------------------------------------------- batch-inference
def batch_parts(out_dir: Path) -> dict[int, list[dict[str, object]]]:
    parts = {int(p.stem.split("-")[1]): p.read_text().splitlines() for p in out_dir.glob("part-*.jsonl")}
    return {task: [json.loads(line) for line in lines] for task, lines in parts.items()}


def test_batch_inference_defaults_generate_a_sample_and_cover_it(
    slurm: CliSlurmClient, slurm_env: dict[str, str], job_dir: Path, submitted: list[str]
) -> None:
    job_id = submit_template("batch-inference", job_dir, job_env(slurm_env, "batch-inference"), submitted)
    assert_completed(finished(slurm, job_id, count=2), job_dir)
    assert "generated a sample input with 10 prompts" in output_of(job_dir, "batch-inference", f"{job_id}_0")
    parts = batch_parts(job_dir / f"batch-inference-{job_id}")
    assert sorted(parts) == [0, 1]
    assert sorted(int(str(r["line"])) for rows in parts.values() for r in rows) == list(range(10))


def test_batch_inference_splits_an_input_file_by_line_number(
    slurm: CliSlurmClient, slurm_env: dict[str, str], job_dir: Path, submitted: list[str]
) -> None:
    prompts = ['{"prompt": "one two three"}', '"a json string"', "plain text line", "", "$(touch x) `y`"]
    (job_dir / "in.txt").write_text("\n".join(prompts * 2) + "\n")
    env = job_env(
        slurm_env, "batch-inference", INPUT=str(job_dir / "in.txt"), OUTPUT_DIR=str(job_dir / "out")
    )
    job_id = submit_template("batch-inference", job_dir, env, submitted, "--array=0-2")
    assert_completed(finished(slurm, job_id, count=3), job_dir)
    parts = batch_parts(job_dir / "out")
    assert sorted(parts) == [0, 1, 2]
    assert all(int(str(r["line"])) % 3 == task for task, rows in parts.items() for r in rows)
    lines = sorted(int(str(r["line"])) for rows in parts.values() for r in rows)
    assert lines == [n for n in range(10) if prompts[n % 5]], "every non-blank line exactly once"
    first = next(r for r in parts[0] if r["line"] == 0)
    assert first["completion"] == "three two one" and first["engine"] == "simulator"
    assert first["prompt_tokens"] == first["completion_tokens"] == 3


# ------------------------------------------------------------------------------------------ model-stage
def sha256sums(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_model_stage_defaults_stage_the_sample_model(
    slurm: CliSlurmClient, slurm_env: dict[str, str], job_dir: Path, submitted: list[str]
) -> None:
    job_id = submit_template("model-stage", job_dir, job_env(slurm_env, "model-stage"), submitted)
    assert_completed(finished(slurm, job_id), job_dir)
    out = output_of(job_dir, "model-stage", job_id)
    (node,) = re.findall(r"^node=(\S+) staged \d+ files, skipped \d+, bytes \d+ ", out, re.MULTILINE)
    cold = Path("/tmp/hpcserve-mc/shared/models/tiny-demo")
    assert sha256sums(Path(f"/tmp/hpcserve-mc/local/{node}/models/tiny-demo")) == sha256sums(cold)


def test_model_stage_copies_to_every_node_then_skips_good_copies(
    slurm: CliSlurmClient, slurm_env: dict[str, str], job_dir: Path, submitted: list[str]
) -> None:
    cold = job_dir / "cold"
    (cold / "shards").mkdir(parents=True)
    (cold / "config.json").write_text('{"layers": 2}\n')
    (cold / "shards" / "w0.bin").write_bytes(bytes(range(256)) * 512)
    env = job_env(slurm_env, "model-stage", MODEL="m", COLD=str(cold), WARM=f"{job_dir}/warm/{{node}}/m")

    first = stage(slurm, job_dir, env, submitted, "--nodes=2")
    nodes = re.findall(r"^node=(\S+) staged", output_of(job_dir, "model-stage", first.job_id), re.MULTILINE)
    assert len(set(nodes)) == 2
    second = stage(slurm, job_dir, env, submitted, "--nodes=2", f"--nodelist={','.join(nodes)}")
    for record, staged, skipped, nbytes in ((first, 2, 0, 131086), (second, 0, 2, 0)):
        out = output_of(job_dir, "model-stage", record.job_id)
        for node in nodes:
            line = f"node={node} staged {staged} files, skipped {skipped}, bytes {nbytes} "
            assert f"{line}warm={job_dir}/warm/{node}/m" in out, out
    for node in nodes:
        assert sha256sums(job_dir / "warm" / node / "m") == sha256sums(cold)


def stage(
    slurm: CliSlurmClient, job_dir: Path, env: Mapping[str, str], submitted: list[str], *args: str
) -> AccountingRecord:
    job_id = submit_template("model-stage", job_dir, env, submitted, *args)
    records = finished(slurm, job_id)
    assert_completed(records, job_dir)
    return records[0]


def test_model_stage_refuses_a_file_that_does_not_match_the_manifest(
    slurm: CliSlurmClient, slurm_env: dict[str, str], job_dir: Path, submitted: list[str]
) -> None:
    cold = job_dir / "cold"
    cold.mkdir()
    (cold / "w.bin").write_bytes(b"weights")
    (cold / "SHA256SUMS").write_text(f"{'0' * 64}  w.bin\n")
    env = job_env(slurm_env, "model-stage", MODEL="m", COLD=str(cold), WARM=f"{job_dir}/warm/{{node}}")
    job_id = submit_template("model-stage", job_dir, env, submitted)
    (record,) = finished(slurm, job_id)
    assert record.state == JobState.FAILED
    assert f"expected {'0' * 64} (fix: re-upload it)" in output_of(job_dir, "model-stage", job_id)
    assert not any((job_dir / "warm").rglob("w.bin*"))
