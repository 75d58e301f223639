"""Fractional GPUs on the real cluster: two deployments of the engine simulator asking for a quarter of a GPU
each, started through the service, run as gres/shard jobs on ONE GPU of ONE node (the minicluster cuts the
infer nodes' GPUs into 4 shards each), each engine started with ``--gpu-memory-utilization 0.25`` and that
GPU in its CUDA_VISIBLE_DEVICES, and ``hpcserve nodes --json`` shows the shards in use.

A job already holding half of a GPU on the last free infer node shows hpcserve's packing: the replicas
fill that GPU, so one GPU serves all three. The baseline, in the same run: what a user would do instead,
the same two requests as plain ``sbatch --gres=shard:1`` jobs placed by Slurm alone, which start another
GPU on the first infer node with room."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcserve.slurm.cli_backend import CliSlurmClient
from tests.conftest import PREFIX, wait_until
from tests.test_serving_cluster import Serving, chat, serve, serving  # noqa: F401 (the fixture)

pytestmark = pytest.mark.cluster
_GRES = re.compile(r"\bNodes=(\S+) .*\bGRES=(\S+)")


def job_gres(job_id: str) -> tuple[str, str]:
    """(node, GRES with its device index) of a running one-node job, from ``scontrol show job -d``:
    ``Nodes=node6 CPU_IDs=0 Mem=1024 GRES=shard:1(IDX:0)`` -> ("node6", "shard:1(IDX:0)")."""
    out = subprocess.run(["scontrol", "show", "job", "-d", job_id], capture_output=True, text=True,
                         check=True, timeout=30).stdout  # fmt: skip
    (match,) = [m for line in out.splitlines() if (m := _GRES.search(line))]
    return match[1], match[2]


def engine_process(served_name: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the engine simulator serving ``served_name`` (the node namespaces share this
    machine's process table; the replica runs as its owner, root here)."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"engine-sim" not in argv or served_name.encode() not in argv:
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not a process
            continue
        env = dict(item.decode().partition("=")[::2] for item in environ if b"=" in item)
        return [a.decode() for a in argv if a], env
    raise AssertionError(f"no engine simulator process serves {served_name}")


def slurm_alone(count: int, slurm: CliSlurmClient) -> set[tuple[str, str]]:
    """The baseline: ``count`` plain ``sbatch -p infer --gres=shard:1`` jobs, placed by Slurm alone (then
    cancelled); the (node, GRES) each got."""
    ids = [subprocess.run(["sbatch", "--parsable", "-p", "infer", "--gres=shard:1", "-t", "10",
                           "-J", "pytest-plain-shard", "-o", "/dev/null", "--wrap", "sleep 600"],
                          capture_output=True, text=True, check=True, timeout=30).stdout.strip()
           for _ in range(count)]  # fmt: skip
    try:
        wait_until(lambda: {j.id for j in slurm.jobs() if j.state == "RUNNING"} >= set(ids), timeout=60)
        return {job_gres(job_id) for job_id in ids}
    finally:
        subprocess.run(["scancel", *ids], capture_output=True, check=False, timeout=60)


@pytest.fixture
def half_gpu(slurm: CliSlurmClient) -> Iterator[tuple[str, str]]:
    """A job holding 2 of the 4 shards of one GPU on the last infer node with a GPU free: (node, its GPU).
    Another infer node with a GPU free must be left, so Slurm alone has somewhere else to go."""
    nodes = [n for n in slurm.snapshot().nodes if n.shards_total and n.gpus_free and not n.shard_gpus]
    if len(nodes) < 2:
        pytest.skip("fewer than two infer nodes have a GPU free for the shard test now")
    node = max(nodes, key=lambda n: int(n.name.removeprefix("node"))).name
    job_id = subprocess.run(["sbatch", "--parsable", "-p", "infer", "-w", node, "--gres=shard:2", "-t", "10",
                             "-J", "pytest-half-gpu", "-o", str(PREFIX / "jobs" / "half-gpu-%j.out"),
                             "--wrap", "sleep 600"], capture_output=True, text=True, check=True,
                            timeout=30).stdout.strip()  # fmt: skip
    try:
        wait_until(lambda: any(j.id == job_id and j.state == "RUNNING" for j in slurm.jobs()), timeout=60)
        where, gres = job_gres(job_id)
        yield where, gres.split("IDX:")[1].rstrip(")")
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, check=False, timeout=60)


def test_two_quarter_gpu_replicas_share_one_gpu_of_one_node(
    serving: Serving,  # noqa: F811 (the fixture imported above)
    slurm: CliSlurmClient,
    half_gpu: tuple[str, str],
) -> None:
    node, gpu = half_gpu
    alone = slurm_alone(2, slurm)
    print(f"Slurm alone: {sorted(alone)} beside the half-used GPU {gpu} of {node}")
    assert (node, f"shard:1(IDX:{gpu})") not in alone  # Slurm alone opens another GPU for them

    names = [serving.name("quarter-a"), serving.name("quarter-b")]
    for name in names:
        got = serve(serving, name, "--gpu-fraction", "0.25", "--min-replicas", "1", "--max-replicas", "1")
        assert got["name"] == name
    wait_until(lambda: all(serving.deployment(n)["ready"] == 1 for n in names), timeout=180, interval=1)

    jobs = {n: next(j for j in slurm.jobs() if j.tag == f"hpcserve:replica:{n}:0") for n in names}
    assert all(j.partition == "infer" and j.gpus == 0 for j in jobs.values())  # no whole GPU held
    placed = {n: job_gres(j.id) for n, j in jobs.items()}
    # packed onto the GPU that already served shards, not onto an idle one
    assert set(placed.values()) == {(node, f"shard:1(IDX:{gpu})")}, (placed, half_gpu)

    for name, job in jobs.items():
        argv, env = engine_process(name)
        assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.25", argv
        assert env["SLURM_JOB_ID"] == job.id
        assert env["CUDA_VISIBLE_DEVICES"] == gpu
        assert env["SLURM_SHARDS_ON_NODE"] == "1"
        assert chat(serving, name).status_code == 200

    out = serving.cli("nodes", "--json")
    assert out.returncode == 0, out.stderr
    view = next(v for v in json.loads(out.stdout) if v["name"] == node)
    assert (view["shards_total"], view["shards_used"], view["shard_gpus"]) == (16, 4, [int(gpu)]), view
    text = serving.cli("nodes", "-p", "infer")
    assert re.search(rf"{node} .*\b\d+/16 on GPU [\d,]*{gpu}", text.stdout), text.stdout
