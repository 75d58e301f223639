"""``ResumableTask``: a submitit ``Checkpointable`` that survives every way Slurm stops a job.

What actually reaches the task on Slurm 22.05 (measured on the local cluster, ``KillWait=5``):

- **Time limit near** (``--signal=USR2@grace``, which submitit sets): USR2 to every task of the step.
  submitit's handler runs ``checkpoint()`` on **rank 0 only**, dumps what it returns as the job's new
  pickle, runs ``scontrol requeue`` itself (once, from rank 0) and exits. Other ranks just log the signal.
- **``scontrol requeue``** (an admin) and **preemption** with ``PreemptMode=REQUEUE``: no USR2. Every task
  gets SIGCONT + SIGTERM, then SIGKILL ``KillWait`` seconds later. submitit ignores SIGTERM (it only logs
  it), so ``checkpoint()`` never runs, and the requeued job starts again from the *original* pickle.

So a task must keep its progress somewhere else: this class saves its state to a JSON file every
``save_every_s`` seconds (at step boundaries), on SIGTERM (within ``KillWait``), and in ``checkpoint()``
(USR2). A restarted run reads the file and goes on from the last saved step, whichever way it was stopped.

Checkpoint marker (for ``lending: overlap``'s gentle victims): each save on rank 0 also touches a marker file,
whose mtime says when the job last checkpointed: ``$HPCSERVE_CHECKPOINT_MARKER`` if set, else
``$HPCSERVE_CHECKPOINT_DIR/<job id>`` (``SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID`` for an array task, else
``SLURM_JOB_ID``) when that folder is set; nothing without either. A marker that cannot be written is skipped
(the service then counts the job's work since its start).

Distributed jobs: all ranks resume from the same file, and only rank 0 writes it (the ranks' states are
assumed replicated, as in data-parallel training; keep per-rank state in per-rank files of your own).
Pitfalls seen in submitit's handler (core/job_environment.py):

- never do collective operations in ``checkpoint()``: it runs in a signal handler, on rank 0 alone, while
  the other ranks carry on until the requeue kills them;
- Python runs a handler between bytecodes: a rank blocked inside a collective (NCCL, gloo) saves and
  requeues only once that call returns;
- submitit counts a USR2 as a *time-out* once the run is past ``min(0.8 T, T - 10 min)`` of its limit T:
  with T <= 10 minutes every USR2 (an admin's preemption signal too) uses up one of ``max_num_timeout``
  requeues (3 by default); SIGTERM-driven requeues are not counted.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Generic, TypeVar

from submitit.helpers import Checkpointable, DelayedSubmission

R = TypeVar("R")
State = dict[str, Any]  # a JSON object
_Handler = Callable[[int, FrameType | None], Any] | int | None


@dataclass(frozen=True, slots=True)
class Saved:
    """What the state file holds: how many times the task started, and the last saved state."""

    starts: int
    state: State


def read_saved(path: Path) -> Saved | None:
    """The state file's content, or None before the first save."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return Saved(starts=int(data["starts"]), state=dict(data["state"]))


def write_saved(path: Path, saved: Saved) -> None:
    """Write atomically (temporary file, then rename): a reader, or a kill mid-write, never sees half a file.
    Each call has its own temporary file, so a signal handler may save while the main flow is saving."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as out:
        json.dump({"starts": saved.starts, "state": saved.state, "saved_at": time.time()}, out)
    Path(tmp).replace(path)


def is_rank_zero() -> bool:
    return os.environ.get("SLURM_PROCID", "0") == "0"


class ResumableTask(Checkpointable, Generic[R]):
    """Subclass it and define ``initial_state``, ``step``, ``finished`` and ``result``; submit an instance.

    The state is a JSON object; put large things (model weights) in files of your own and their path in the
    state. ``state_file`` defaults to ``<job folder>/<job id>_state.json`` inside a submitit job.
    """

    save_every_s: float = 60.0

    def __init__(self, state_file: str | Path | None = None) -> None:
        self.state_file = Path(state_file) if state_file is not None else None
        self._live: _Live | None = None

    # ------------------------------------------------------------------------------ to define
    def initial_state(self, *args: Any, **kwargs: Any) -> State:
        raise NotImplementedError

    def step(self, state: State) -> State:
        """One unit of work; returns the new state (do not change ``state`` in place)."""
        raise NotImplementedError

    def finished(self, state: State) -> bool:
        raise NotImplementedError

    def result(self, state: State) -> R:
        raise NotImplementedError

    def on_start(self, state: State, starts: int) -> State:
        """Called as each run begins (``starts`` = 1 for the first run) with the state it resumes from."""
        return state

    # ------------------------------------------------------------------------------ the loop
    def __call__(self, *args: Any, **kwargs: Any) -> R:
        path = self.state_file or _default_state_file()
        saved = read_saved(path)
        state = saved.state if saved else self.initial_state(*args, **kwargs)
        starts = (saved.starts if saved else 0) + 1
        self._live = live = _Live(path, starts, self.on_start(state, starts))
        live.save()
        with _on_sigterm(live.save):
            while not self.finished(live.state):
                live.state = self.step(live.state)
                if time.monotonic() - live.saved_at >= self.save_every_s:
                    live.save()
        live.save()
        return self.result(live.state)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Called by submitit's USR2 handler, on rank 0 only: save, then requeue the same call."""
        if self._live is not None:
            self._live.save()
        return DelayedSubmission(self, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_live": None}  # the state travels in the file, not in the pickle


class _Live:
    """The running task's state and where it goes; ``save`` is safe to call from a signal handler."""

    def __init__(self, path: Path, starts: int, state: State) -> None:
        self.path, self.starts, self.state = path, starts, state
        self.saved_at = float("-inf")

    def save(self) -> None:
        if is_rank_zero():
            write_saved(self.path, Saved(self.starts, self.state))
            mark_checkpoint()
        self.saved_at = time.monotonic()


MARKER_ENV = "HPCSERVE_CHECKPOINT_MARKER"
MARKER_DIR_ENV = "HPCSERVE_CHECKPOINT_DIR"


def marker_path(environ: Mapping[str, str]) -> Path | None:
    """Where this job's checkpoint marker goes (see the module's docstring), or None."""
    if environ.get(MARKER_ENV):
        return Path(environ[MARKER_ENV])
    folder, job = environ.get(MARKER_DIR_ENV), slurm_job_id(environ)
    return Path(folder) / job if folder and job else None


def slurm_job_id(environ: Mapping[str, str]) -> str | None:
    """The job's id as squeue prints it: ``<array job>_<task>`` for an array task."""
    array, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else environ.get("SLURM_JOB_ID")


def mark_checkpoint(environ: Mapping[str, str] | None = None) -> None:
    """Touch the marker (its mtime: now); safe in a signal handler, silent when it cannot be written."""
    path = marker_path(os.environ if environ is None else environ)
    if path is None:
        return
    try:
        path.touch()
        os.utime(path)
    except OSError:
        pass


def _default_state_file() -> Path:
    from submitit import JobEnvironment

    env = JobEnvironment()  # raises outside a submitit job: pass state_file there
    return Path(env.paths.folder) / f"{env.job_id}_state.json"


@contextmanager
def _on_sigterm(save: Callable[[], None]) -> Iterator[None]:
    """While the loop runs, SIGTERM saves the state first, then goes on to the previous handler (submitit's,
    which logs it and keeps the task running until KillWait ends in SIGKILL)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: _Handler = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: FrameType | None) -> None:
        save()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:  # not under submitit: terminate, as SIGTERM would have
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
