"""The pyslurm 25.11 backend: pure conversions on objects shaped like pyslurm's, and the client's wiring.

pyslurm cannot be installed against this cluster's Slurm 22.05, so the live test is skipped here; the
SimpleNamespace objects carry exactly the attribute names and value shapes read in pyslurm 25.11's source
(see the module docstring of hpcserve.slurm.pyslurm_backend).
"""

from __future__ import annotations

import importlib.util
import sys
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from hpcserve.errors import HpcserveError, SlurmParseError
from hpcserve.slurm.models import Job, JobState, Switch, Topology
from hpcserve.slurm.protocol import JobFilter, SlurmClient
from hpcserve.slurm.pyslurm_backend import (
    PyslurmClient,
    array_task_ids,
    filter_jobs,
    gpu_count,
    job_from_pyslurm,
    jobs_from_pyslurm,
    node_from_pyslurm,
    partition_from_pyslurm,
)

T0 = 1795384161  # epoch seconds, as pyslurm's submit_time/start_time return them
NOW = datetime.fromtimestamp(T0 + 600, UTC)  # when the test "observes" the jobs


def ps_job(**overrides: Any) -> SimpleNamespace:
    """A pyslurm.Job as 25.11 exposes it: a plain, non-array, pending CPU job unless overridden."""
    attrs: dict[str, Any] = {
        "id": 100, "name": "train", "user_name": "alice", "user_id": 1000, "account": "ml",
        "partition": "train", "qos": "normal", "state": "PENDING", "state_reason": "Priority",
        "num_nodes": 1, "allocated_nodes": None, "submit_time": T0, "start_time": None,
        "time_limit": 60, "comment": None, "array_id": None, "array_task_id": None,
        "array_tasks_waiting": None, "gres_per_node": {},
    }  # fmt: skip
    attrs.update(overrides)
    return SimpleNamespace(**attrs)


def ps_node(name: str = "node1", **overrides: Any) -> SimpleNamespace:
    attrs: dict[str, Any] = {
        "name": name, "state": "IDLE", "partitions": ["train", "all"],
        "configured_gres": {"gpu:h100": 4}, "allocated_gres": {}, "available_features": ["ib", "h100"],
        "total_cpus": 8, "allocated_cpus": 0, "real_memory": 16000, "allocated_memory": 0,
        "address": "10.213.0.1", "reason": None,
    }  # fmt: skip
    attrs.update(overrides)
    return SimpleNamespace(**attrs)


def ps_partition(**overrides: Any) -> SimpleNamespace:
    attrs: dict[str, Any] = {
        "name": "train", "nodes": "node[1-4]", "state": "UP", "is_default": True, "max_time": 10080,
        "default_time": 60, "priority_tier": 10, "preempt_mode": "REQUEUE",
    }  # fmt: skip
    attrs.update(overrides)
    return SimpleNamespace(**attrs)


# ------------------------------------------------------------------------------------------ jobs
def test_running_two_node_gpu_job() -> None:
    obj = ps_job(
        id=200, state="RUNNING", state_reason="None", num_nodes=2, allocated_nodes="node[1-2]",
        start_time=T0 + 30, gres_per_node={"gres/gpu:h100": 4}, comment="hpcserve:replica:llama:0",
    )  # fmt: skip
    job = job_from_pyslurm(obj, NOW)
    assert job.id == "200" and job.job_id == 200
    assert job.state is JobState.RUNNING and job.nodes == ("node1", "node2") and job.num_nodes == 2
    assert job.gpus == 8  # gres_per_node is per node
    assert job.reason == ""  # pyslurm says "None" for no reason, as squeue does
    assert job.submit == datetime.fromtimestamp(T0, UTC) and job.wait_s == 30  # started 30 s after submit
    assert job.time_limit_s == 3600 and job.tag == "hpcserve:replica:llama:0"


def test_pending_array_task_zero_and_split_task() -> None:
    # pyslurm's u32_parse maps array_task_id 0 to None
    task0 = job_from_pyslurm(ps_job(id=301, array_id=300, array_task_id=None, gres_per_node={"gpu": 1}), NOW)
    task4 = job_from_pyslurm(ps_job(id=305, array_id=300, array_task_id=4, state_reason="Resources"), NOW)
    assert (task0.id, task0.job_id, task0.gpus) == ("300_0", 301, 1)
    assert (task4.id, task4.state, task4.reason) == ("300_4", JobState.PENDING, "Resources")
    assert task4.start is None and task4.nodes == ()


def test_pending_array_meta_record_expands_like_squeue_r() -> None:
    meta = ps_job(id=300, array_id=300, array_tasks_waiting="1-3,8")
    assert job_from_pyslurm(meta, NOW).id == "300_[1-3,8]"
    jobs = jobs_from_pyslurm([meta, ps_job(id=400)], NOW)
    assert [j.id for j in jobs] == ["300_1", "300_2", "300_3", "300_8", "400"]
    assert {j.job_id for j in jobs[:4]} == {300}


def test_job_unlimited_time_and_unknown_uid() -> None:
    class UnknownUid(SimpleNamespace):
        @property
        def user_name(self) -> str:
            raise KeyError(4242)  # what pyslurm's uid_to_name raises for a uid missing from passwd

    fields = vars(ps_job(time_limit=None, user_id=4242))
    del fields["user_name"]  # the property above stands in for it
    job = job_from_pyslurm(UnknownUid(**fields), NOW)
    assert job.user == "4242" and job.time_limit_s is None


def test_array_task_ids() -> None:
    assert array_task_ids("0-3,7,10-20:5") == (0, 1, 2, 3, 7, 10, 15, 20)
    with pytest.raises(SlurmParseError, match="array task list"):
        array_task_ids("1-x")


def test_gpu_count_prefers_untyped_total_from_tres() -> None:
    assert gpu_count({"gpu": 2, "gpu:h100": 2}) == 2  # allocated_gres lists the total and the typed count
    assert gpu_count({"gpu:h100": 2, "gpu:a100": 1}) == 3
    assert gpu_count({"gpu:h100": {"count": 2, "indexes": "0-1"}, "shard": 8}) == 2
    assert gpu_count({}) == 0 and gpu_count(None) == 0


# ----------------------------------------------------------------------------------------- nodes
def test_drained_node() -> None:
    node = node_from_pyslurm(ps_node("node3", state="IDLE+DRAIN", reason="bad gpu"))
    assert node.state == "idle" and node.flags == frozenset({"DRAIN"})
    assert node.display_state == "drained" and not node.available and node.gpus_free == 0
    assert node.reason == "bad gpu" and node.gpus_total == 4 and node.gpu_type == "h100"


def test_mixed_node_with_allocated_gpus() -> None:
    obj = ps_node(
        state="MIXED", allocated_gres={"gpu": 2, "gpu:h100": 2}, allocated_cpus=4, allocated_memory=8000
    )
    node = node_from_pyslurm(obj)
    assert (node.state, node.gpus_alloc, node.gpus_free) == ("mixed", 2, 2)
    assert (node.cpus_total, node.cpus_alloc, node.memory_mb, node.memory_alloc_mb) == (8, 4, 16000, 8000)
    assert node.partitions == ("train", "all") and node.features == ("ib", "h100")
    assert node.address == "10.213.0.1" and node.reason == ""


def test_not_responding_node() -> None:
    node = node_from_pyslurm(ps_node(state="DOWN+NOT_RESPONDING", configured_gres={}))
    assert node.display_state == "down*" and node.gpus_total == 0 and node.gpu_type is None


# ------------------------------------------------------------------------------------ partitions
def test_partition_with_unlimited_max_time() -> None:
    obj = ps_partition(
        name="all", nodes="node[1-8]", max_time="UNLIMITED", default_time=None, is_default=False
    )
    part = partition_from_pyslurm(obj, {f"node{i}": 4 for i in range(1, 9)})
    assert part.max_time_s is None and part.default_time_s is None
    assert part.nodes[-1] == "node8" and part.total_gpus == 32 and not part.default


def test_partition_with_limits() -> None:
    part = partition_from_pyslurm(ps_partition())
    assert (part.max_time_s, part.default_time_s, part.priority_tier) == (604800, 3600, 10)
    assert part.default and part.state == "UP" and part.preempt_mode == "REQUEUE" and part.total_gpus == 0


# ---------------------------------------------------------------------------------------- filter
def _job(id: str, state: JobState, user: str = "alice", partition: str = "train") -> Job:
    return Job(id=id, job_id=int(id.split("_")[0]), name="j", user=user, account="", partition=partition,
               state=state, num_nodes=1)  # fmt: skip


def test_filter_jobs_like_squeue() -> None:
    jobs = [
        _job("1", JobState.RUNNING), _job("2", JobState.PENDING, user="bob", partition="infer,train"),
        _job("3", JobState.COMPLETED), _job("4_0", JobState.PENDING), _job("4_1", JobState.RUNNING),
    ]  # fmt: skip

    def ids(filt: JobFilter) -> list[str]:
        return [j.id for j in filter_jobs(jobs, filt)]

    assert ids(JobFilter()) == ["1", "2", "4_0", "4_1"]  # terminal jobs hidden, as squeue does
    assert ids(JobFilter(states=("all",))) == ["1", "2", "3", "4_0", "4_1"]
    assert ids(JobFilter(states=("PD",))) == ["2", "4_0"]
    assert ids(JobFilter(user="bob")) == ["2"]
    assert ids(JobFilter(partitions=("infer",))) == ["2"]
    assert ids(JobFilter(job_ids=("4",))) == ["4_0", "4_1"]
    assert ids(JobFilter(job_ids=("4_1", "1"))) == ["1", "4_1"]


# ---------------------------------------------------------------------------------------- client
class _Collection:
    """What pyslurm's Jobs/Nodes/Partitions.load() return, as far as the client uses it."""

    def __init__(self, items: list[SimpleNamespace]) -> None:
        self._items = items

    def values(self) -> list[SimpleNamespace]:
        return self._items


class _RPCError(Exception):
    pass


def _fake_pyslurm(jobs: list[SimpleNamespace], fail: bool = False) -> SimpleNamespace:
    """A module object with pyslurm 25.11's entry points, injected the way a transport is."""

    def load(items: list[SimpleNamespace]) -> SimpleNamespace:
        def _load() -> _Collection:
            if fail:
                raise _RPCError("Unable to contact slurm controller (connect failure)")
            return _Collection(items)

        return SimpleNamespace(load=_load)

    ping = SimpleNamespace(is_responding=True, hostname="ctl", latency=1.2)
    return SimpleNamespace(
        Jobs=load(jobs), Nodes=load([ps_node("node1"), ps_node("node2")]),
        Partitions=load([ps_partition(nodes="node[1-2]")]), RPCError=_RPCError,
        slurmctld=SimpleNamespace(ping_primary=lambda: ping),
    )  # fmt: skip


class _Delegate:
    """Records the writes the pyslurm client forwards to the CLI backend."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def topology(self) -> Topology:
        return Topology((Switch("leaf1", 0, ("node1",)),))

    def submit(self, script: str, sbatch_args: Any = ()) -> str:
        self.calls.append(("submit", tuple(sbatch_args)))
        return "77"

    def cancel(self, job_ids: Any, *, signal: str | None = None) -> None:
        self.calls.append(("cancel", (tuple(job_ids), signal)))

    def accounting(self, job_ids: Any) -> list[Any]:
        self.calls.append(("accounting", tuple(job_ids)))
        return []


def test_client_snapshot_filters_and_forwards_writes() -> None:
    delegate = _Delegate()
    at = datetime(2026, 11, 22, tzinfo=UTC)
    module = _fake_pyslurm([ps_job(id=1), ps_job(id=2, state="COMPLETED")])
    client = PyslurmClient(delegate, module=module, clock=lambda: at)  # type: ignore[arg-type]
    assert isinstance(client, SlurmClient)
    snap = client.snapshot()
    assert snap.at == at and [j.id for j in snap.jobs] == ["1"]
    assert snap.node("node1") is not None and snap.node("node1").switch == "leaf1"  # type: ignore[union-attr]
    assert snap.partitions[0].total_gpus == 8 and client.ping().ok
    assert client.submit("#!/bin/sh\n", ["-p", "infer"]) == "77"
    client.cancel(["1"], signal="TERM")
    client.accounting(["1"])
    assert [c[0] for c in delegate.calls] == ["submit", "cancel", "accounting"]


def test_client_without_delegate_reads_only() -> None:
    client = PyslurmClient(module=_fake_pyslurm([]))
    assert client.topology() == Topology()
    with pytest.raises(HpcserveError, match="only reads: submit"):
        client.submit("#!/bin/sh\n")


def test_client_turns_rpc_errors_into_one_line() -> None:
    client = PyslurmClient(module=_fake_pyslurm([], fail=True))
    with pytest.raises(HpcserveError, match=r"pyslurm\.Jobs\.load\(\) failed: Unable to contact"):
        client.jobs()


def test_missing_pyslurm_says_25_11_and_cli_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyslurm", None)  # import fails as if not installed
    with pytest.raises(HpcserveError) as err:
        PyslurmClient()
    message = str(err.value)
    assert "\n" not in message and "25.11" in message and "slurm.backend: cli" in message


# ------------------------------------------------------------------------------------ real cluster
@pytest.mark.cluster
@pytest.mark.usefixtures("slurm_env")  # SLURM_CONF for libslurm, from tests/conftest.py
@pytest.mark.skipif(
    importlib.util.find_spec("pyslurm") is None,
    reason="pyslurm is published only for Slurm 25.11; this cluster runs 22.05",
)
class TestRealCluster:
    def test_snapshot(self) -> None:
        snap = PyslurmClient().snapshot()
        assert len(snap.nodes) == 8
        assert {p.name for p in snap.partitions} >= {"train", "infer", "all"}
        assert all(n.partitions for n in snap.nodes)
        assert sum(n.gpus_total for n in snap.nodes) == snap.partition("all").total_gpus  # type: ignore[union-attr]

    def test_ping(self) -> None:
        assert PyslurmClient().ping().ok
