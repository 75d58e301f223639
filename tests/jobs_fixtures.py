"""Callables that cluster tests submit. They run in jobs on the nodes: submitit pickles them by reference
(``tests.jobs_fixtures.add``), and hpcserve puts this repo on the job's PYTHONPATH (callables.import_root).
Keep imports light: torch is imported only where it is used."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from hpcserve.jobs.resumable import ResumableTask, State


def add(a: int, b: int) -> int:
    return a + b


def where(x: int) -> dict[str, Any]:
    """Where and with what the task ran."""
    return {
        "double": 2 * x,
        "host": socket.gethostname(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "exported": os.environ.get("HPCSERVE_TEST_VALUE"),
    }


def all_reduce(value: int) -> dict[str, Any]:
    """Join the job's process group with torch's own env:// rendezvous (the variables must already be
    there: hpcserve sets them for multi-task jobs) and sum ``value * (rank + 1)`` over the ranks."""
    import torch
    import torch.distributed as dist

    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    env = {name: os.environ[name] for name in names}
    dist.init_process_group("gloo", init_method="env://")
    try:
        tensor = torch.tensor([value * (dist.get_rank() + 1)])
        dist.all_reduce(tensor)
        return {
            "rank": dist.get_rank(),
            "world": dist.get_world_size(),
            "sum": int(tensor.item()),
            "host": socket.gethostname(),
            "backend": str(dist.get_backend()),
            "env": env,
        }
    finally:
        dist.destroy_process_group()


def square(x: int) -> int:
    return x * x


class CounterTask(ResumableTask[int]):
    """Sums 0..steps-1, one number per step of ``step_s`` seconds, saving after every step."""

    save_every_s = 0.0

    def __init__(self, state_file: str, steps: int, step_s: float) -> None:
        super().__init__(state_file)
        self.steps, self.step_s = steps, step_s

    def initial_state(self, *args: Any, **kwargs: Any) -> State:
        return {"step": 0, "total": 0, "started_at": []}

    def on_start(self, state: State, starts: int) -> State:
        """Records the step each run started from: the proof that a requeued run resumed."""
        return {**state, "started_at": [*state["started_at"], state["step"]]}

    def step(self, state: State) -> State:
        time.sleep(self.step_s)
        return {**state, "step": state["step"] + 1, "total": state["total"] + state["step"]}

    def finished(self, state: State) -> bool:
        return bool(state["step"] >= self.steps)

    def result(self, state: State) -> int:
        return int(state["total"])
