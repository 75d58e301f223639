"""Python callables through submitit (hpcserve.jobs.callables) on the real local Slurm 22.05 cluster."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import submitit

from hpcserve.config.policy import JobClassName
from hpcserve.jobs.callables import submit_array, submit_resolved
from hpcserve.jobs.resumable import read_saved
from hpcserve.jobs.spec import JobRequest, ResolvedJob
from hpcserve.slurm.cli_backend import CliSlurmClient
from tests import jobs_fixtures
from tests.conftest import wait_until

pytestmark = pytest.mark.cluster


def resolved(
    name: str, *, preemptible: bool = False, env: dict[str, str] | None = None, **req: Any
) -> ResolvedJob:
    """What policy and placement would hand over: train partition, 5 minutes."""
    request = JobRequest(job_class=JobClassName.TRAINING, name=f"pytest-{name}", user="root", **req)
    return ResolvedJob(
        request=request, partition=request.partition or "train", qos="normal", time_s=300,
        preemptible=preemptible, grace_s=60, tag=f"hpcserve:test:{name}", env=env or {},
    )  # fmt: skip


def results(job: submitit.Job[Any], timeout: float = 60) -> list[Any]:
    """job.results() with a deadline: result pickles are checked every 0.2 s, sacct as submitit paces it."""
    wait_until(job.done, timeout=timeout)
    return job.results()


def show_job(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout


def restarts(job_id: str) -> int:
    match = re.search(r"\bRestarts=(\d+)", show_job(job_id))
    assert match is not None, f"no Restarts in scontrol show job {job_id}"
    return int(match[1])


def test_callable_returns_its_result_from_a_node_with_its_gpus_and_env(
    slurm: CliSlurmClient, job_dir: Path, submitted: list[str]
) -> None:
    job = resolved("where", gpus_per_node=2, env={"HPCSERVE_TEST_VALUE": "a b'c $HOME"})
    sjob = submit_resolved(job, jobs_fixtures.where, 21, folder=job_dir / "%j")
    submitted.append(sjob.job_id)
    (got,) = results(sjob)
    assert (got["double"], got["exported"]) == (42, "a b'c $HOME")
    gpus = got["cuda_visible_devices"].split(",")  # two of the node's four (others' jobs may hold 0,1)
    assert len(set(gpus)) == 2 and set(gpus) <= {"0", "1", "2", "3"}
    assert re.fullmatch(r"node[1-4]", got["host"])  # the train partition
    assert "Comment=hpcserve:test:where" in show_job(sjob.job_id)


def test_failing_callable_raises_its_error(
    slurm: CliSlurmClient, job_dir: Path, submitted: list[str]
) -> None:
    sjob = submit_resolved(resolved("fail"), jobs_fixtures.add, "a", 1, folder=job_dir / "%j")
    submitted.append(sjob.job_id)
    wait_until(sjob.done, timeout=60)
    with pytest.raises(submitit.core.utils.FailedJobError, match="TypeError"):
        sjob.result()


def test_two_node_job_gets_the_torch_env_and_all_reduces_over_gloo(
    slurm: CliSlurmClient, job_dir: Path, submitted: list[str]
) -> None:
    sjob = submit_resolved(resolved("gloo", nodes=2, tasks_per_node=1), jobs_fixtures.all_reduce, 5,
                           folder=job_dir / "%j")  # fmt: skip
    submitted.append(sjob.job_id)
    ranks = sorted(results(sjob, timeout=120), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world"] for r in ranks} == {2}
    assert [r["sum"] for r in ranks] == [5 * 1 + 5 * 2] * 2 and {r["backend"] for r in ranks} == {"gloo"}
    assert len({r["host"] for r in ranks}) == 2  # one rank per node
    assert {r["env"]["MASTER_ADDR"] for r in ranks} == {ranks[0]["host"]}
    assert {r["env"]["LOCAL_WORLD_SIZE"] for r in ranks} == {"1"}


def test_sweep_is_one_job_array_with_every_result(
    slurm: CliSlurmClient, job_dir: Path, submitted: list[str]
) -> None:
    job = resolved("sweep", array="0-3%2")
    jobs = submit_array(job, jobs_fixtures.square, [(1,), (2,), (3,), (4,)], job_dir / "%j")
    array_ids = {j.job_id.split("_")[0] for j in jobs}
    submitted.extend(array_ids)
    assert len(array_ids) == 1 and [j.job_id.split("_")[1] for j in jobs] == ["0", "1", "2", "3"]
    assert [results(j)[0] for j in jobs] == [1, 4, 9, 16]
    assert "ArrayTaskThrottle=2" in show_job(next(iter(array_ids)))


def test_preemptible_task_resumes_after_scontrol_requeue_and_after_usr2(
    slurm: CliSlurmClient, job_dir: Path, submitted: list[str]
) -> None:
    """Two ways a running job is stopped and requeued, run side by side (each requeue waits cred_expire=30 s):

    - ``scontrol requeue`` (an admin, or preemption): SIGTERM, no USR2; the task resumes from the state it
      saved (after every step, and on SIGTERM).
    - USR2 (what ``--signal=USR2@grace`` sends before the time limit) to a 2-task job: every rank gets it,
      rank 0 alone checkpoints and requeues, and the job is requeued exactly once.
    """
    steps, expected = 16, sum(range(16))
    state = {name: job_dir / f"{name}.json" for name in ("term", "usr2")}

    def counter(name: str) -> jobs_fixtures.CounterTask:
        return jobs_fixtures.CounterTask(str(state[name]), steps=steps, step_s=0.5)

    term = submit_resolved(resolved("term", preemptible=True), counter("term"), folder=job_dir / "%j")
    usr2 = submit_resolved(
        resolved("usr2", preemptible=True, tasks_per_node=2), counter("usr2"), folder=job_dir / "%j"
    )
    submitted.extend([term.job_id, usr2.job_id])

    def progressed(path: Path) -> bool:
        saved = read_saved(path)
        return saved is not None and saved.state["step"] >= 3

    wait_until(lambda: progressed(state["term"]) and progressed(state["usr2"]), timeout=60)
    subprocess.run(["scontrol", "requeue", term.job_id], check=True)
    subprocess.run(["scancel", "--signal=USR2", usr2.job_id], check=True)

    assert results(term, timeout=150) == [expected]
    assert results(usr2, timeout=150) == [expected, expected]
    for sjob, path in ((term, state["term"]), (usr2, state["usr2"])):
        saved = read_saved(path)
        assert saved is not None and saved.starts == 2
        first, resumed = saved.state["started_at"]
        assert first == 0 and 3 <= resumed < steps, saved  # the second run went on from the saved step
        assert restarts(sjob.job_id) == 1
