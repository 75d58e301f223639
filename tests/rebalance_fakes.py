"""A fake Slurm for the rebalance executor's unit tests: nodes, partitions and jobs in memory, with the
operator writes changing them as slurmctld would. The proof on real Slurm: tests/test_rebalance_cluster.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta

import msgspec

from hpcserve.errors import SlurmCommandError
from hpcserve.slurm.models import AccountingRecord, ClusterSnapshot, Job, JobState, Node, Partition, Topology
from hpcserve.slurm.protocol import JobFilter, Ping

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
DOWN = "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"


class Clock:
    """A clock that only ``sleep`` moves forward."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def job(job_id: int, node: str, partition: str = "infer", tag: str | None = None, gpus: int = 1) -> Job:
    return Job(id=str(job_id), job_id=job_id, name=f"j{job_id}", user="u", account="a",
               partition=partition, state=JobState.RUNNING, num_nodes=1, nodes=(node,), gpus=gpus,
               comment=tag or "", tag=tag)  # fmt: skip


class FakeSlurm:
    """node[1-8] with 4 GPUs each, train=node[1-4], infer=node[5-8], all=node[1-8]."""

    def __init__(self) -> None:
        names = [f"node{i}" for i in range(1, 9)]
        self.parts: dict[str, tuple[str, ...]] = {"train": tuple(names[:4]), "infer": tuple(names[4:]),
                                                  "all": tuple(names)}  # fmt: skip
        self.node_map = {n: Node(n, "idle", gpus_total=4) for n in names}
        self.job_list: list[Job] = []
        self.scripts: dict[str, str] = {}
        self.calls: list[tuple[str, ...]] = []
        self.down = False
        self.unrequeueable: set[str] = set()
        self.on_signal: Callable[[str, bool], None] = lambda job_id, batch: None
        self.fail_on: dict[str, BaseException] = {}

    # ---------------------------------------------------------------------------------------- helpers
    def _call(self, *call: str) -> None:
        if self.down:
            raise SlurmCommandError([call[0]], 1, DOWN)
        if call[0] in self.fail_on:
            raise self.fail_on.pop(call[0])
        self.calls.append(call)

    def leave(self, job_id: str) -> None:
        """The job is requeued (pending again, off its node)."""
        self.job_list = [msgspec.structs.replace(j, state=JobState.PENDING, nodes=()) if j.id == job_id else j
                         for j in self.job_list]  # fmt: skip

    def set_node(self, name: str, **changes: object) -> None:
        self.node_map[name] = dataclasses.replace(self.node_map[name], **changes)  # type: ignore[arg-type]

    # ---------------------------------------------------------------------------------------- reads
    def ping(self) -> Ping:
        return Ping(not self.down, "fake")

    def jobs(self, filt: JobFilter | None = None) -> list[Job]:
        self._call("squeue")
        return list(self.job_list)

    def nodes(self) -> list[Node]:
        self._call("sinfo")
        return [dataclasses.replace(n, partitions=tuple(p for p, ns in self.parts.items() if n.name in ns))
                for n in self.node_map.values()]  # fmt: skip

    def partitions(self) -> list[Partition]:
        self._call("show-partition")
        return [Partition(name, nodes) for name, nodes in self.parts.items()]

    def topology(self) -> Topology:
        return Topology()

    def snapshot(self) -> ClusterSnapshot:
        return ClusterSnapshot(T0, tuple(self.nodes()), tuple(self.jobs()), tuple(self.partitions()))

    def accounting(self, job_ids: Iterable[str]) -> list[AccountingRecord]:
        return []

    def submit(self, script: str, sbatch_args: Sequence[str] = ()) -> str:
        raise NotImplementedError

    def cancel(self, job_ids: Iterable[str], *, signal: str | None = None) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- writes
    def update_partition_nodes(self, partition: str, nodes: Iterable[str]) -> None:
        nodes = tuple(nodes)
        self._call("update-partition", partition, ",".join(nodes))
        self.parts[partition] = nodes

    def drain(self, nodes: Iterable[str], reason: str) -> None:
        for name in nodes:
            self._call("drain", name)
            self.set_node(name, flags=self.node_map[name].flags | {"DRAIN"}, reason=reason)

    def resume(self, nodes: Iterable[str]) -> None:
        for name in nodes:
            self._call("resume", name)
            self.set_node(name, flags=self.node_map[name].flags - {"DRAIN"}, reason="")

    def requeue(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            self._call("requeue", job_id)
            if job_id in self.unrequeueable:
                problem = "scontrol: error: Requested operation is presently disabled"
                raise SlurmCommandError(["scontrol", "requeue", job_id], 1, problem)
            self.leave(job_id)

    def signal(self, job_ids: Iterable[str], signal: str, *, batch: bool) -> None:
        for job_id in job_ids:
            self._call("signal", job_id, signal, "batch" if batch else "steps")
            self.on_signal(job_id, batch)

    def batch_script(self, job_id: str) -> str:
        self._call("batch-script", job_id)
        return self.scripts.get(job_id, "#!/bin/sh\nsrun python -m submitit.core._submit\n")
