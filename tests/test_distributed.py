"""torch.distributed's env from Slurm's variables (pure), as srun printed them on the local cluster."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpcserve.errors import HpcserveError
from hpcserve.jobs import distributed
from hpcserve.jobs.distributed import PORT_BASE, PORT_SPAN, master_port, tasks_per_node, torch_env_from

# `srun -p train -N2 --ntasks-per-node=2` on the minicluster, task 3 (second task on node2)
TASK3 = {
    "SLURM_JOB_ID": "11551028",
    "SLURM_JOB_NODELIST": "node[1-2]",
    "SLURM_STEP_NODELIST": "node[1-2]",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "4",
    "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
}


def test_task_of_a_two_node_job() -> None:
    assert torch_env_from(TASK3) == {
        "MASTER_ADDR": "node1",
        "MASTER_PORT": str(PORT_BASE + 11551028 % PORT_SPAN),
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
    }


def test_all_ranks_agree_on_the_rendezvous() -> None:
    ranks = [{**TASK3, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r % 2)} for r in range(4)]
    envs = [torch_env_from(env) for env in ranks]
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"], e["WORLD_SIZE"]) for e in envs} == {
        ("node1", envs[0]["MASTER_PORT"], "4")
    }
    assert [e["RANK"] for e in envs] == ["0", "1", "2", "3"]


def test_uneven_tasks_per_node_gives_each_node_its_own_local_world_size() -> None:
    # `srun -n3 -N2`: node1 runs two tasks, node2 one
    env = {**TASK3, "SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_NTASKS": "3", "SLURM_PROCID": "2"}
    assert torch_env_from({**env, "SLURM_NODEID": "0"})["LOCAL_WORLD_SIZE"] == "2"
    assert torch_env_from({**env, "SLURM_NODEID": "1"})["LOCAL_WORLD_SIZE"] == "1"


def test_step_nodelist_wins_over_the_jobs() -> None:
    # a step on part of the allocation: rank 0 runs on the step's first node
    env = {**TASK3, "SLURM_JOB_NODELIST": "node[1-4]", "SLURM_STEP_NODELIST": "node[3-4]"}
    assert torch_env_from(env)["MASTER_ADDR"] == "node3"


def test_batch_shell_without_a_step_is_a_world_of_one() -> None:
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu-a[07,09]"}
    got = torch_env_from(env)
    assert (got["MASTER_ADDR"], got["RANK"], got["WORLD_SIZE"], got["LOCAL_WORLD_SIZE"]) == (
        "gpu-a07", "0", "1", "1",
    )  # fmt: skip


@pytest.mark.parametrize("missing", ["SLURM_JOB_ID", "SLURM_JOB_NODELIST"])
def test_outside_a_job_says_so(missing: str) -> None:
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node1"}
    del env[missing]
    with pytest.raises(HpcserveError, match="not inside a Slurm job"):
        torch_env_from(env)


@pytest.mark.parametrize(
    ("text", "counts"),
    [("2(x2)", [2, 2]), ("4", [4]), ("2(x3),1", [2, 2, 2, 1]), ("1,3(x2)", [1, 3, 3])],
)
def test_tasks_per_node(text: str, counts: list[int]) -> None:
    assert tasks_per_node(text) == counts


def test_bad_tasks_per_node() -> None:
    with pytest.raises(HpcserveError, match="tasks per node"):
        tasks_per_node("2(y3)")


@given(st.integers(min_value=0, max_value=2**32))
def test_master_port_is_unprivileged_and_below_the_ephemeral_range(job_id: int) -> None:
    port = master_port(str(job_id))
    assert 1024 <= PORT_BASE <= port < PORT_BASE + PORT_SPAN <= 32768


def test_master_port_needs_a_numeric_job_id() -> None:
    with pytest.raises(HpcserveError, match="MASTER_PORT"):
        master_port("12_3")


def test_torch_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in TASK3.items():
        monkeypatch.setenv(name, value)
    assert distributed.torch_env() == torch_env_from(TASK3)
