"""sacct's gres/gpuutil and gres/gpumem (the second source of GPU telemetry), parsed from literal sacct
text: what `sacct -n -P --noconvert --allusers --format=JobID,User,End,NTasks,AllocTRES,TRESUsageInAve`
prints on a cluster whose slurmd gathers GPU usage (the local cluster's fake GPUs do not)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hpcserve.service.sacct_gpu import SacctGpu
from hpcserve.slurm.gpu_usage import job_samples, parse_sacct_gpu, sacct_gpu_argv, size_bytes, tres
from hpcserve.slurm.runner import CommandResult
from hpcserve.store import HistoryStore

SACCT = """\
1201|alice|2026-12-07T18:10:00|1|billing=2,cpu=2,gres/gpu=2,mem=4G,node=1|
1201.batch||2026-12-07T18:10:00|1|cpu=2,gres/gpu=2,mem=4G,node=1|cpu=00:10:00,energy=0,fs/disk=2166,gres/gpumem=21474836480,gres/gpuutil=90,mem=1048576,pages=0,vmem=2097152
1201.extern||2026-12-07T18:10:01|1|billing=2,cpu=2,gres/gpu=2,mem=4G,node=1|cpu=00:00:00,energy=0,fs/disk=5273,gres/gpumem=0,gres/gpuutil=0,mem=262144,pages=0,vmem=0
1202|bob|2026-12-07T18:20:00|2|billing=4,cpu=4,gres/gpu=4,mem=8G,node=2|
1202.batch||2026-12-07T18:20:00|1|cpu=2,gres/gpu=2,mem=4G,node=1|cpu=00:00:01,gres/gpumem=0,gres/gpuutil=0,mem=1000
1202.0||2026-12-07T18:19:58|2|cpu=4,gres/gpu=4,mem=8G,node=2|cpu=00:20:00,gres/gpumem=38888M,gres/gpuutil=30,mem=2000
1203|carol|2026-12-07T18:30:00|1|billing=1,cpu=1,mem=1G,node=1|
1203.batch||2026-12-07T18:30:00|1|cpu=1,mem=1G,node=1|cpu=00:00:05,energy=0,fs/disk=100,mem=1000,pages=0,vmem=0
1204.batch||2026-12-07T18:40:00|1|cpu=1,gres/gpu=1,node=1|gres/gpumem=1G,gres/gpuutil=50
1205.batch||Unknown|1|cpu=1,gres/gpu=1,node=1|gres/gpumem=1G,gres/gpuutil=50
"""
AT = {"1201": "2026-12-07T18:10:00", "1202": "2026-12-07T18:20:00"}


def local(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def test_steps_with_gpu_usage_are_read_with_their_jobs_user() -> None:
    steps = {(s.job_id, s.step): s for s in parse_sacct_gpu(SACCT)}
    # no user for 1204 (no job line) and no end time for 1205: dropped; 1203 has no GPU figures
    assert set(steps) == {("1201", "batch"), ("1201", "extern"), ("1202", "batch"), ("1202", "0")}
    batch = steps[("1201", "batch")]
    assert (batch.user, batch.gpuutil, batch.gpumem_bytes, batch.gpus_per_task) == ("alice", 90.0,
                                                                                  20 << 30, 2.0)  # fmt: skip
    assert batch.end == local("2026-12-07T18:10:00")
    assert steps[("1202", "0")].gpumem_bytes == 38888 << 20 and steps[("1202", "0")].gpus_per_task == 2


def test_one_reading_per_job_from_its_busiest_step_per_gpu() -> None:
    found = {sample.job_id: (user, sample) for user, sample in job_samples(parse_sacct_gpu(SACCT))}
    alice = found["1201"][1]
    assert found["1201"][0] == "alice" and alice.util_pct == 45.0  # 90 over the task's 2 GPUs
    assert alice.at == local(AT["1201"]) and alice.gpu_uuid == "" and alice.mem_total_bytes == 0
    bob = found["1202"][1]
    assert found["1202"][0] == "bob" and bob.util_pct == 15.0  # step 0: 30 over 2 GPUs per task
    assert bob.at == local(AT["1202"]) and bob.mem_used_bytes == 38888 << 20
    assert set(found) == {"1201", "1202"}


def test_helpers() -> None:
    assert tres("cpu=00:01:00,gres/gpuutil=45") == {"cpu": "00:01:00", "gres/gpuutil": "45"}
    assert tres("") == {}
    assert [size_bytes(t) for t in ("1024", "2K", "1.5G", "x", "", "-1")] == [1024, 2048, 3 << 29, None,
                                                                            None, None]  # fmt: skip
    argv = sacct_gpu_argv("2026-12-07T18:00:00", "2026-12-07T19:00:00")
    assert argv[:5] == ["sacct", "-n", "-P", "--noconvert", "--allusers"]
    assert "--format=JobID,User,End,NTasks,AllocTRES,TRESUsageInAve" in argv


class Recorded:
    """A command runner that answers sacct with recorded text (a unit test's stand-in for Slurm)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.argvs: list[list[str]] = []

    def __call__(self, argv: Any, *, timeout: float, stdin: str | None = None) -> CommandResult:
        self.argvs.append(list(argv))
        return CommandResult(tuple(argv), 0, self.text, "")


def test_the_service_stores_each_jobs_reading_once_as_source_sacct(tmp_path: Path) -> None:
    now = datetime(2026, 12, 7, 19, 0, tzinfo=UTC)
    with HistoryStore(f"sqlite:///{tmp_path}/h.db") as store:
        store.upgrade()
        store.create_deployment("llama", "bob", {"name": "llama"}, 1, served_model_name="llama")
        store.upsert_replica("llama", 0, job_id="1202", state="ready")
        runner = Recorded(SACCT)
        reader = SacctGpu(runner, store, 10.0, clock=lambda: now)  # type: ignore[arg-type]
        assert reader.tick() == 2
        assert reader.tick() == 0  # the same jobs again (an overlapping read): nothing twice
        rows = {r.job_id: r for r in store.gpu_samples(None)}
        assert {(j, r.user, r.kind, r.deployment, r.source, r.util_pct) for j, r in rows.items()} == {
            ("1201", "alice", "training", None, "sacct", 45.0),
            ("1202", "bob", "inference", "llama", "sacct", 15.0),
        }
        assert store.job_utilisation(now - timedelta(hours=2)) == {"1201": 45.0, "1202": 15.0}
        assert runner.argvs[0][0] == "sacct" and any(a.startswith("--starttime=") for a in runner.argvs[0])


def test_the_local_clusters_fake_gpus_give_nothing() -> None:
    """Two steps as the local cluster's sacct printed them (AccountingStorageTRES=gres/gpu, AutoDetect=off),
    under a job line: Slurm's own fields are there, GPU usage is not, so the second source reads nothing."""
    recorded = (
        "44391643|alice|2026-12-07T18:25:25|1|billing=1,cpu=1,gres/gpu=1,mem=1024M,node=1|\n"
        "44391643.batch||2026-12-07T18:25:25|1|cpu=1,gres/gpu=1,mem=1024M,node=1|cpu=00:00:00,energy=0,"
        "fs/disk=49865,mem=12734464,pages=2,vmem=226578432\n"
        "44391643.0||2026-12-07T18:25:25|1|cpu=1,gres/gpu=1,mem=1024M,node=1|cpu=00:00:05,energy=0,"
        "fs/disk=19798041,mem=111939584,pages=0,vmem=308125696\n"
    )
    assert parse_sacct_gpu(recorded) == []
