"""The pure half of callable submission (parameters, quoting, import paths, ``module:function``), the
submission path with a recording client, and ResumableTask run locally. No cluster needed."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from submitit.core.utils import DelayedSubmission
from submitit.slurm.slurm import _make_sbatch_string

from hpcserve.config.policy import JobClassName
from hpcserve.errors import SlurmCommandError, ValidationError
from hpcserve.jobs import callables
from hpcserve.jobs.callables import (
    CallableSubmitter,
    array_parallelism,
    env_setup_lines,
    executor_parameters,
    import_root,
    pythonpath_lines,
    resolve_callable,
)
from hpcserve.jobs.distributed import WithTorchEnv
from hpcserve.jobs.resumable import read_saved
from hpcserve.jobs.spec import JobRequest, ResolvedJob
from hpcserve.telemetry.injob import WithTelemetry
from tests import jobs_fixtures
from tests.conftest import REPO

needs_srun = pytest.mark.skipif(shutil.which("srun") is None, reason="submitit's SlurmExecutor needs srun")
NASTY = ["plain", "a b", "it's", 'say "hi"', "$HOME `id` $(id)", "tab\there", "new\nline", "", "*"]


def resolved(array: str | None = None, **job: Any) -> ResolvedJob:
    request = JobRequest(job_class=JobClassName.TRAINING, name="train-llm", user="ada", account="ml", nodes=2,
                         gpus_per_node=4, tasks_per_node=4, cpus_per_task=8, array=array)  # fmt: skip
    fields: dict[str, Any] = {
        "partition": "train", "qos": "normal", "time_s": 7230, "preemptible": True, "grace_s": 120,
        "tag": "hpcserve:train:train-llm", "nodelist": ("node1", "node2"), "switches": "1@00:10:00",
        "constraint": "ib", "env": {"NCCL_IB_HCA": "mlx5_0,mlx5_1"},
    }  # fmt: skip
    return ResolvedJob(request=request, **(fields | job))


def sbatch_lines(params: dict[str, Any]) -> list[str]:
    text = _make_sbatch_string(command="python -m x", folder="/shared/%j", **params)
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


def test_resolved_job_becomes_these_sbatch_options() -> None:
    lines = sbatch_lines(executor_parameters(resolved()))
    assert {
        "#SBATCH --job-name=train-llm", "#SBATCH --partition=train", "#SBATCH --qos=normal",
        "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --cpus-per-task=8",
        "#SBATCH --gres=gpu:4", "#SBATCH --account=ml", "#SBATCH --comment=hpcserve:train:train-llm",
        "#SBATCH --time=0-02:00:30", "#SBATCH --nodelist='node[1-2]'", "#SBATCH --switches=1@00:10:00",
        "#SBATCH --constraint=ib", "#SBATCH --requeue", "#SBATCH --signal=USR2@120",
    } <= set(lines)  # fmt: skip
    assert len([line for line in lines if line.startswith("#SBATCH --time")]) == 1  # the exact one wins
    # submitit shlex-quotes values; sbatch strips the quotes (ReqNodeList=node[1-2] on the cluster)


def test_plain_job_is_not_requeued_and_leaves_placement_to_slurm() -> None:
    job = resolved(preemptible=False, nodelist=(), switches=None, constraint=None, env={})
    params = executor_parameters(job)
    lines = sbatch_lines(params)
    assert not [line for line in lines if line.split("=")[0] in ("#SBATCH --requeue", "#SBATCH --nodelist")]
    assert params["setup"] == [] and params["time"] == 121  # minutes, rounded up, for submitit's count
    assert "#SBATCH --hold" not in lines
    held = dataclasses.replace(job, request=dataclasses.replace(job.request, hold=True))
    assert "#SBATCH --hold" in sbatch_lines(executor_parameters(held))  # a replica under lending: overlap


def test_extra_options_and_array_limit() -> None:
    params = executor_parameters(resolved(array="0-99%10"), extra={"hold": True})
    assert params["array_parallelism"] == 10 and "#SBATCH --hold" in sbatch_lines(params)


@pytest.mark.parametrize(("spec", "limit"), [("0-99%10", 10), ("0-3", None), (None, None)])
def test_array_parallelism(spec: str | None, limit: int | None) -> None:
    assert array_parallelism(spec) == limit


def test_bad_array_limit() -> None:
    with pytest.raises(ValidationError, match="bad limit"):
        array_parallelism("0-3%x")


def bash(lines: Sequence[str], echo: str, env: dict[str, str] | None = None) -> str:
    script = "\n".join([*lines, f'printf %s "{echo}"'])
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, check=True).stdout


@pytest.mark.parametrize("value", NASTY)
def test_env_values_reach_the_job_verbatim(value: str) -> None:
    assert bash(env_setup_lines({"V": value}), "$V") == value


def test_bad_env_name() -> None:
    with pytest.raises(ValidationError, match="not a variable name"):
        env_setup_lines({"A-B": "1"})


def test_import_root_of_a_repo_module_and_of_installed_ones() -> None:
    task = jobs_fixtures.CounterTask("/tmp/x", 1, 0)
    for fn in (jobs_fixtures.add, functools.partial(jobs_fixtures.add, 1), task):
        assert import_root(fn) == REPO
    assert import_root(json.dumps) is None and import_root(print) is None


@pytest.mark.parametrize("before", [None, "/opt/lib"])
def test_pythonpath_line_appends_the_root(before: str | None) -> None:
    env = {"PATH": os.environ["PATH"]} | ({"PYTHONPATH": before} if before else {})
    want = f"{before}:{REPO}" if before else str(REPO)
    assert bash(pythonpath_lines(jobs_fixtures.add), "$PYTHONPATH", env) == want


def test_resolve_callable() -> None:
    assert resolve_callable("tests.jobs_fixtures:add") is jobs_fixtures.add
    assert resolve_callable("json:dumps") is json.dumps
    assert resolve_callable("tests.jobs_fixtures:CounterTask.result") is jobs_fixtures.CounterTask.result


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("json.dumps", "expected MODULE:FUNCTION"),
        ("json:", "expected MODULE:FUNCTION"),
        ("../x:f", "expected MODULE:FUNCTION"),
        ("no_such_module_hpcserve:f", "cannot import 'no_such_module_hpcserve': No module named"),
        ("json:nope", "'json' has no attribute 'nope'"),
        ("json:__name__", "is a str, not callable"),
    ],
)
def test_resolve_callable_errors_are_one_line(target: str, says: str) -> None:
    with pytest.raises(ValidationError, match=says) as err:
        resolve_callable(target)
    assert "\n" not in str(err.value)


def test_resolve_callable_finds_modules_in_the_app_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "hpcserve_app_mod.py").write_text("def main():\n    return 7\n")
    fn = resolve_callable("hpcserve_app_mod:main", app_dir=tmp_path)
    assert fn() == 7 and import_root(fn) == tmp_path.resolve()
    monkeypatch.delitem(sys.modules, "hpcserve_app_mod")


def test_module_that_fails_at_import_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "hpcserve_broken_mod.py").write_text("raise RuntimeError('boom\\nsecond line')\n")
    with pytest.raises(ValidationError, match="cannot import 'hpcserve_broken_mod': boom") as err:
        resolve_callable("hpcserve_broken_mod:f", app_dir=tmp_path)
    assert "\n" not in str(err.value)


class RecordingClient:
    """Stands in for CliSlurmClient: keeps what would be sbatch'ed, answers a job id or fails."""

    def __init__(self, fail: bool = False) -> None:
        self.scripts: list[str] = []
        self.fail = fail

    def submit(self, script: str, sbatch_args: Sequence[str] = ()) -> str:
        if self.fail:
            raise SlurmCommandError(["sbatch", "--parsable"], 1, "sbatch: error: Invalid qos specification")
        self.scripts.append(script)
        return "4242"


@needs_srun
def test_submit_writes_the_pickle_and_script_where_submitit_looks(tmp_path: Path) -> None:
    client = RecordingClient()
    submitter = CallableSubmitter(client, extra_sbatch={"hold": True})
    job = submitter.submit(resolved(), jobs_fixtures.add, 1, b=2, folder=tmp_path / "%j")
    assert job.job_id == "4242" and job.num_tasks == 8  # 2 nodes x 4 tasks
    delayed = DelayedSubmission.load(tmp_path / "4242" / "4242_submitted.pkl")
    assert isinstance(delayed.function, WithTelemetry)  # GPUs: each node reports them (hpcserve.telemetry)
    assert isinstance(delayed.function.fn, WithTorchEnv)  # 8 tasks: each rank sees the torch.distributed env
    assert (delayed.function.fn.fn, delayed.args, delayed.kwargs) == (jobs_fixtures.add, (1,), {"b": 2})
    (script,) = client.scripts
    assert "#SBATCH --hold" in script and "export NCCL_IB_HCA=mlx5_0,mlx5_1" in script
    assert (tmp_path / "4242" / "4242_submission.sh").read_text() == script
    assert not list(tmp_path.glob("*.pkl"))  # the staged pickle moved into the job's folder


@needs_srun
def test_failed_sbatch_leaves_no_pickle_behind(tmp_path: Path) -> None:
    submitter = CallableSubmitter(RecordingClient(fail=True))
    with pytest.raises(SlurmCommandError, match="Invalid qos"):
        submitter.submit(resolved(), jobs_fixtures.add, 1, 2, folder=tmp_path / "%j")
    assert not list(tmp_path.rglob("*.pkl"))


@needs_srun
def test_single_submission_refuses_an_array_and_an_empty_sweep(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="submit_array"):
        callables.submit_resolved(resolved(array="0-3"), jobs_fixtures.add, 1, 2, folder=tmp_path)
    with pytest.raises(ValidationError, match="empty sweep"):
        callables.submit_array(resolved(), jobs_fixtures.add, [], tmp_path)


def test_resumable_task_resumes_from_its_state_file(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    assert jobs_fixtures.CounterTask(str(state), steps=4, step_s=0)() == 6
    assert jobs_fixtures.CounterTask(str(state), steps=4, step_s=0)() == 6  # finished: nothing left to do
    saved = read_saved(state)
    assert saved is not None and saved.starts == 2 and saved.state["started_at"] == [0, 4]


def test_checkpoint_resubmits_the_task_without_its_live_state(tmp_path: Path) -> None:
    task = jobs_fixtures.CounterTask(str(tmp_path / "s.json"), steps=2, step_s=0)
    task()
    delayed = task.checkpoint()
    delayed.dump(tmp_path / "ckpt.pkl")
    again = DelayedSubmission.load(tmp_path / "ckpt.pkl").function
    assert isinstance(again, jobs_fixtures.CounterTask) and again._live is None and again.steps == 2


class SignalsItself(jobs_fixtures.CounterTask):
    """Gets SIGTERM during step 2 (as ``scontrol requeue`` would send it), then fails at step 3."""

    save_every_s = float("inf")  # only the SIGTERM save can record step 2

    def step(self, state: dict[str, Any]) -> dict[str, Any]:
        if state["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        if state["step"] == 3:
            raise RuntimeError("killed")
        return super().step(state)


def test_sigterm_saves_the_state_then_calls_the_previous_handler(tmp_path: Path) -> None:
    seen: list[int] = []

    def previous(signum: int, frame: FrameType | None) -> None:  # what submitit installs: log, go on
        seen.append(signum)

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with pytest.raises(RuntimeError, match="killed"):
            SignalsItself(str(tmp_path / "s.json"), steps=9, step_s=0)()
        assert signal.getsignal(signal.SIGTERM) is previous  # restored
    finally:
        signal.signal(signal.SIGTERM, old)
    saved = read_saved(tmp_path / "s.json")
    assert seen == [signal.SIGTERM] and saved is not None and saved.state["step"] == 2
