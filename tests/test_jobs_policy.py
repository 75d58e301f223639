"""The policy check, purely: each rule refuses with its own name, and a good request resolves fully."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hpcserve.config import load_policy
from hpcserve.config.policy import JobClassName, Policy
from hpcserve.errors import ValidationError
from hpcserve.jobs.policy import PolicyViolation, array_size, gpus_in_use, resolve, time_option
from hpcserve.jobs.spec import JobRequest, seconds_to_slurm
from hpcserve.jobs.submit import with_marker_dir
from hpcserve.slurm.models import Job, JobState

POLICY = Path(__file__).resolve().parent.parent / "policies" / "default.yaml"


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(POLICY)


def training(**kw: object) -> JobRequest:
    fields: dict[str, object] = {"job_class": JobClassName.TRAINING, "name": "t", "user": "alice"}
    return JobRequest(**{**fields, **kw})  # type: ignore[arg-type]


def test_good_request_resolves_to_the_class(policy: Policy) -> None:
    job = resolve(training(nodes=2, gpus_per_node=4, time_s=3600), policy, kind="train")
    assert (job.partition, job.qos, job.time_s, job.preemptible, job.grace_s) == (
        "train",
        "normal",
        3600,
        True,
        120,
    )
    assert job.tag == "hpcserve:train:t"
    args = job.sbatch_args()
    assert "--partition=train" in args and "--gres=gpu:4" in args and "--nodes=2" in args
    assert "--time=0-01:00:00" in args and "--signal=B:USR2@120" in args and "--requeue" in args


def test_default_time_comes_from_the_class(policy: Policy) -> None:
    assert resolve(training(), policy).time_s == 4 * 3600


def test_non_preemptible_class_gets_no_signal(policy: Policy) -> None:
    req = JobRequest(JobClassName.INTERACTIVE, "i", "alice", gpus_per_node=1)
    args = resolve(req, policy).sbatch_args()
    assert not any(a.startswith("--signal") for a in args) and "--requeue" not in args


@pytest.mark.parametrize(
    ("request_kw", "used", "rule"),
    [
        ({"nodes": 5, "gpus_per_node": 4}, 0, "classes.training.max_gpus_per_job"),
        ({"nodes": 2, "gpus_per_node": 4}, 12, "classes.training.max_gpus_per_user"),
        ({"gpus_per_node": 4, "array": "0-9"}, 0, "classes.training.max_gpus_per_user"),
        ({"partition": "infer"}, 0, "classes.training.partition"),
        ({"time_s": 3 * 86400 + 1}, 0, "classes.training.max_time"),
    ],
)
def test_each_violation_names_its_rule(
    policy: Policy, request_kw: dict[str, object], used: int, rule: str
) -> None:
    with pytest.raises(PolicyViolation) as info:
        resolve(training(**request_kw), policy, gpus_used=used)
    assert info.value.rule == rule
    assert str(info.value).startswith(f"policy {rule}: ") and "(fix: " in str(info.value)


def test_array_throttle_limits_what_counts(policy: Policy) -> None:
    job = resolve(training(gpus_per_node=4, array="0-99%4"), policy)
    assert "--array=0-99%4" in job.sbatch_args()


@pytest.mark.parametrize(
    ("spec", "size"), [(None, 1), ("7", 1), ("0-9", 10), ("1,3,5", 3), ("0-20:5", 5), ("0-99%10", 10)]
)
def test_array_size(spec: str | None, size: int) -> None:
    assert array_size(spec) == size


@pytest.mark.parametrize("spec", ["a-b", "5-1", "0-9%0", "1;touch x"])
def test_bad_array_spec(spec: str) -> None:
    with pytest.raises(ValidationError, match="--array"):
        array_size(spec)


def test_usage_counts_live_jobs_of_the_user_only() -> None:
    def job(user: str, gpus: int, state: JobState) -> Job:
        return Job("1", 1, "j", user, "a", "train", state, 1, gpus=gpus)

    jobs = [job("alice", 4, JobState.RUNNING), job("alice", 2, JobState.PENDING),
            job("alice", 8, JobState.COMPLETED), job("bob", 4, JobState.RUNNING)]  # fmt: skip
    assert gpus_in_use(jobs, "alice") == 6


def test_time_option() -> None:
    assert time_option("1-00:00:00") == 86400 and time_option("90") == 5400
    with pytest.raises(ValidationError, match="UNLIMITED is never submitted"):
        time_option("UNLIMITED")
    with pytest.raises(ValidationError, match="-t/--time"):
        time_option("soon")
    assert seconds_to_slurm(90061) == "1-01:01:01"


def test_preemptible_jobs_get_the_sites_checkpoint_marker_folder(policy: Policy) -> None:
    job = resolve(training(), policy, 0, kind="template")
    assert job.preemptible
    marked = with_marker_dir(job, Path("/shared/ckpt"))
    assert marked.env["HPCSERVE_CHECKPOINT_DIR"] == "/shared/ckpt"
    assert with_marker_dir(job, None) is job  # no folder declared: nothing exported
    own = dataclasses.replace(job, env={"HPCSERVE_CHECKPOINT_DIR": "/mine"})
    assert with_marker_dir(own, Path("/shared/ckpt")).env["HPCSERVE_CHECKPOINT_DIR"] == "/mine"
    steady = dataclasses.replace(job, preemptible=False)
    assert "HPCSERVE_CHECKPOINT_DIR" not in with_marker_dir(steady, Path("/shared/ckpt")).env


def test_gpu_shards_count_as_the_part_of_a_gpu_they_are() -> None:
    from hpcserve.jobs.policy import part_gpus

    jobs = [Job("1", 1, "a", "alice", "acct", "infer", JobState.RUNNING, 1, gpus=1),
            Job("2", 2, "b", "alice", "acct", "infer", JobState.PENDING, 1, shards=1),
            Job("3", 3, "c", "alice", "acct", "infer", JobState.RUNNING, 1, shards=2)]  # fmt: skip
    assert gpus_in_use(jobs, "alice") == 1  # shards not counted: as before
    assert gpus_in_use(jobs, "alice", shards_per_gpu=4) == 1.75
    assert part_gpus(1, 0.25, 4) == 0.25 and part_gpus(1, 0.3, 4) == 0.5  # 0.3 takes 2 shards of 4
    assert part_gpus(2, None, 4) == 2.0
    policy = load_policy(POLICY)
    limit = policy.for_class(JobClassName.INFERENCE).max_gpus_per_user
    quarter = JobRequest(JobClassName.INFERENCE, "q", "alice", gres="shard:1")
    resolve(quarter, policy, gpus_used=limit - 0.25, shards_per_gpu=4)  # fits exactly
    with pytest.raises(PolicyViolation, match=f"holds or waits for {limit - 0.2:g} GPUs; 0.25 more"):
        resolve(quarter, policy, gpus_used=limit - 0.2, shards_per_gpu=4)
