"""The API's pure checks without a cluster: the owner's GPU limits (other owners and the service's own
replica jobs left out), the warm tier, and reading logs without following a link."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from hpcserve.api.deployments import check_model, check_shares, check_warm_tier
from hpcserve.api.limits import OwnerUsage, check_replicas, owner_usage, replica_gpus
from hpcserve.api.replica_logs import open_under
from hpcserve.config import load_policy, load_site_config
from hpcserve.errors import HpcserveError, ValidationError
from hpcserve.jobs.policy import PolicyViolation
from hpcserve.slurm.models import Job, JobState
from hpcserve.store import Deployment
from tests.conftest import POLICY, SITE

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def deployment(
    name: str, owner: str, desired: int, gpus: int = 1, low: int = 0, deleted: bool = False
) -> Deployment:
    spec = {"gpus_per_replica": gpus, "nodes_per_replica": 1, "min_replicas": low}
    return Deployment(name, owner, spec, 1, desired, T0, T0, T0 if deleted else None)


def job(job_id: str, user: str, gpus: int, state: JobState = JobState.RUNNING) -> Job:
    return Job(job_id, int(job_id), "j", user, f"acct-{user}", "infer", state, 1, gpus=gpus)


def test_owner_usage_counts_the_owners_other_deployments_and_own_jobs_only() -> None:
    deployments = [deployment("mine", "alice", 3), deployment("other", "alice", 1, gpus=2, low=2),
                   deployment("gone", "alice", 5, deleted=True), deployment("bobs", "bob", 4)]  # fmt: skip
    jobs = [job("11", "alice", 2), job("12", "alice", 4), job("13", "alice", 8, JobState.COMPLETED),
            job("14", "bob", 4)]  # fmt: skip
    usage = owner_usage("alice", "mine", deployments, jobs, replica_job_ids=["12"])
    assert usage == OwnerUsage(deployments=4, jobs=2)  # other: min 2 x 2 GPUs; job 12 is a replica


def test_a_replica_on_part_of_a_gpu_counts_as_that_part_and_so_do_shard_jobs() -> None:
    quarter = {"gpus_per_replica": 1, "nodes_per_replica": 1, "gpu_fraction": 0.25}
    assert replica_gpus(quarter) == 0.25 and replica_gpus({"gpus_per_replica": 2}) == 2
    assert replica_gpus({**quarter, "gpu_fraction": 0.3}) == 0.5  # 2 shards of 4: what it holds
    deployments = [Deployment("q", "alice", {**quarter, "min_replicas": 3}, 1, 0, T0, T0, None)]
    jobs = [msgspec.structs.replace(job("21", "alice", 0), shards=1), job("22", "alice", 1)]
    usage = owner_usage("alice", None, deployments, jobs, replica_job_ids=[])
    assert usage == OwnerUsage(deployments=0.75, jobs=1.25)
    policy = load_policy(POLICY)  # inference: 16 GPUs per user
    check_replicas(policy, "alice", 0.25, 64, OwnerUsage(0, 0))  # 64 quarters: 16 GPUs
    with pytest.raises(PolicyViolation, match=r"hold or want 0.25 GPUs; 64 replicas x 0.25 GPUs = 16 more"):
        check_replicas(policy, "alice", 0.25, 64, OwnerUsage(0.25, 0))


def test_a_pools_replicas_count_once_on_the_pools_row() -> None:
    shape = {"gpus_per_replica": 2, "nodes_per_replica": 1}
    pool = Deployment(
        "p", "alice", {"kind": "pool", "name": "p", **shape, "min_replicas": 2}, 1, 2, T0, T0, None
    )
    member = {"pool": "p", **shape, "min_replicas": 2}
    members = [Deployment(m, "alice", {"name": m, **member}, 1, 2, T0, T0, None) for m in ("a", "b")]
    assert owner_usage("alice", None, [pool, *members], [], []) == OwnerUsage(deployments=4, jobs=0)
    assert owner_usage("alice", "p", [pool, *members], [], []) == OwnerUsage(deployments=0, jobs=0)


def test_check_replicas_names_the_rule() -> None:
    policy = load_policy(POLICY)  # inference: 4 GPUs per job, 16 per user
    check_replicas(policy, "alice", 4, 3, OwnerUsage(4, 0))
    with pytest.raises(PolicyViolation, match=r"^policy classes\.inference\.max_gpus_per_user: alice's"):
        check_replicas(policy, "alice", 4, 3, OwnerUsage(4, 1))
    with pytest.raises(PolicyViolation, match=r"^policy classes\.inference\.max_gpus_per_job"):
        check_replicas(policy, "alice", 5, 1, OwnerUsage(0, 0))


@pytest.mark.parametrize("tier", ["/tmp/hpcserve-mc/local/{node}/models",
                                  "/tmp/hpcserve-mc/local/{node}/models/alice/",
                                  "/tmp/hpcserve-mc/local/{node}//models/./x"])  # fmt: skip
def test_a_warm_tier_under_the_sites_is_taken(tier: str) -> None:
    check_warm_tier(load_site_config(SITE), tier)


@pytest.mark.parametrize("tier", ["/tmp/hpcserve-mc/local/{node}/models/../../etc", "/etc/{node}", "/tmp",
                                  "/tmp/hpcserve-mc/local/{node}/modelsX"])  # fmt: skip
def test_a_warm_tier_elsewhere_is_refused(tier: str) -> None:
    with pytest.raises(ValidationError, match=r"^warm_tier: "):
        check_warm_tier(load_site_config(SITE), tier)


def test_model_and_shares() -> None:
    with pytest.raises(ValidationError, match=r"^model: '--trust-remote-code'"):
        check_model("--trust-remote-code")
    assert check_shares(["root", "@root", "all", "root"]) == ["root", "@root", "all"]
    for bad in (["no-such-user-x"], ["@no-such-group-x"], ["-rf"], "root"):
        with pytest.raises(ValidationError, match=r"^shares: "):
            check_shares(bad)


def test_open_under_never_follows_a_link(tmp_path: Path) -> None:
    (tmp_path / "alice" / "dep").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    os.close(open_under(tmp_path, tmp_path / "alice" / "dep"))
    (tmp_path / "bob").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        open_under(tmp_path, tmp_path / "bob")
    with pytest.raises(HpcserveError, match="not under"):
        open_under(tmp_path / "alice", tmp_path / "bob")


class NoJobs:
    """The owner has no GPU jobs of their own in the inference partition."""

    def jobs(self, *args: object, **kwargs: object) -> list[Job]:
        return []


def test_serving_into_a_pool_counts_its_replicas_once(tmp_path: Path) -> None:
    from hpcserve.api.caller import Caller
    from hpcserve.api.context import ApiContext
    from hpcserve.api.deployments import create
    from hpcserve.store import HistoryStore

    alice = Caller(1001, "alice", frozenset())
    shape = {"model": "m", "engine": "simulator", "gpus_per_replica": 4, "max_replicas": 4}
    with HistoryStore(f"sqlite:///{tmp_path}/h.db") as store:  # inference: 4 GPUs per job, 16 per user
        store.upgrade()
        api = ApiContext(load_site_config(SITE), load_policy(POLICY), store, NoJobs())  # type: ignore[arg-type]
        for member in ("a", "b"):  # each keeps 3 replicas of 4 GPUs: the pool keeps 3, 12 GPUs, not 24
            create(api, alice, {"name": member, "pool": "p", "min_replicas": 3, **shape})
        pool = store.get_deployment("p")
        assert pool is not None and pool.spec["min_replicas"] == 3
        create(api, alice, {"name": "c", "min_replicas": 1, **shape})  # 12 + 4 = 16: fits
        with pytest.raises(PolicyViolation, match="hold or want 16 GPUs; 1 replicas x 4 GPUs"):
            create(api, alice, {"name": "d", "min_replicas": 1, **shape})
        with pytest.raises(PolicyViolation, match="hold or want 4 GPUs; 4 replicas x 4 GPUs"):
            create(api, alice, {"name": "e", "pool": "p", "min_replicas": 4, **shape})  # the pool grows to 4
