"""Python callables as Slurm jobs through submitit, sized and placed by a ``ResolvedJob``.

The jobs are plain submitit jobs (``job.result()``, ``job.results()``, ``job.cancel()`` work as usual), but a
single callable does not take submitit's ``Executor.submit`` path. Where that path's time goes, profiled
with cProfile on the local cluster (20 held jobs, one executor reused, as a loop over ``submit()`` does):

    199 ms per job = 190 ms  PicklingExecutor._throttle(): time.sleep(0.2) whenever the executor's previous
                             submission was less than 0.2 s ago (a deliberate rate limit; it sleeps the
                             full 0.2 s, not the remainder, so every submission but the first pays it)
                   +   8 ms  _submit_command: sbatch through CommandFunction (Popen + a poll() loop over
                             stdout/stderr, 7 ms), the submission file written, moved and symlinked
                   +   1 ms  the rest: cloudpickle of the call (0.3 ms), the pickle moved, pathlib objects

(scripts/bench/submit_throughput measures the same split on 100 jobs: 204 = 194 + 9.4 + 0.5 ms.) There is
no sacct wait and no watcher call at submission (the watcher only registers the id). A batch() array pays
the throttle at most once for all its items (0.9 ms per item in arrays of 25).

Here each submission builds the submission text and the pickle with submitit's own pure hooks
(``_make_submission_file_text``, ``DelayedSubmission.dump``, ``JobPaths``) and runs ``sbatch --parsable``
once through hpcserve's runner (script on stdin): 7.7 ms per job against 5.8 ms for a raw sbatch loop.
Throttling submissions belongs to the caller's policy, not to a fixed sleep.

Mapping (``executor_parameters``): partition, QoS, nodes, tasks per node, CPUs, GPUs as ``--gres=gpu:N``
(or the request's ``gres``: ``shard:N``, a MIG type), the exact ``--time``, ``--comment`` = hpcserve's tag,
nodelist/switches/constraint, the job's env exported
in the script (shlex-quoted). Preemptible jobs add ``--requeue`` and ``--signal=USR2@grace_s``: without
``B:``, so the signal reaches the Python tasks (srun steps), where submitit's handler is, and not the batch
shell. USR2 rather than USR1 because NCCL installs its own USR1 handler in every rank and would swallow it.
Resuming after a requeue: ``hpcserve.jobs.resumable.ResumableTask`` (and what Slurm really sends).

torch.distributed: a job of more than one task runs the callable wrapped in ``WithTorchEnv``, which sets
MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE in each rank before the call
(they differ per task, so the shared batch script cannot export them); or call
``hpcserve.jobs.distributed.init_process_group()``, which sets them and joins the group.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
import shlex
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import submitit
from submitit.core.utils import DelayedSubmission, FailedJobError, JobPaths

from hpcserve import hostlists
from hpcserve.errors import SlurmCommandError, ValidationError
from hpcserve.jobs.resumable import ResumableTask
from hpcserve.jobs.spec import ResolvedJob, seconds_to_slurm

__all__ = [
    "CallableSubmitter",
    "ResumableTask",
    "env_setup_lines",
    "executor_parameters",
    "resolve_callable",
    "submit_array",
    "submit_resolved",
]


class Sbatch(Protocol):
    """What submission needs of a Slurm client (``SlurmClient.submit``; e.g. ``CliSlurmClient``)."""

    def submit(self, script: str, sbatch_args: Sequence[str] = ()) -> str: ...


DEFAULT_MAX_TIMEOUTS = 3  # submitit's requeues after a time limit; preemptions do not count
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


# ---------------------------------------------------------------------------------------------- pure
def env_setup_lines(env: Mapping[str, str]) -> list[str]:
    """``export NAME=value`` lines for the job script, values quoted for bash."""
    bad = [name for name in env if not _ENV_NAME.match(name)]
    if bad:
        raise ValidationError(f"job env: {bad[0]!r} is not a variable name (fix: letters, digits and _)")
    return [f"export {name}={shlex.quote(value)}" for name, value in env.items()]


def import_root(fn: Callable[..., Any]) -> Path | None:
    """The sys.path entry ``fn``'s module was imported from, when the job might not find it there: submitit
    pickles functions by reference, and a module found through a path added at run time (the current
    directory, pytest's rootdir) is missing in the job. None for ``__main__`` (pickled by value) and for
    modules installed under the interpreter's prefix."""
    target = getattr(fn, "func", fn)  # functools.partial
    name = getattr(target, "__module__", None) or type(target).__module__
    file = getattr(sys.modules.get(name), "__file__", None)
    return None if name == "__main__" or file is None else _module_root(name, file)


@functools.cache
def _module_root(name: str, file: str) -> Path | None:
    path = Path(file).resolve()
    root = path.parents[name.count(".") + (path.name == "__init__.py")]
    installed = (Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve())
    return None if any(root.is_relative_to(p) for p in installed) else root


def pythonpath_lines(fn: Callable[..., Any]) -> list[str]:
    """Appends ``import_root(fn)`` to the job's PYTHONPATH (after, so it never shadows installed code)."""
    root = import_root(fn)
    if root is None:
        return []
    return [f"export PYTHONPATH=${{PYTHONPATH:+$PYTHONPATH:}}{shlex.quote(str(root))}"]


def array_parallelism(spec: str | None) -> int | None:
    """The ``%N`` limit of an ``--array`` spec (``0-99%10`` -> 10); None without one."""
    limit = (spec or "").partition("%")[2]
    if not limit:
        return None
    if not limit.isdigit() or int(limit) < 1:
        raise ValidationError(f"--array: bad limit %{limit} (fix: a positive number after %)")
    return int(limit)


def executor_parameters(
    job: ResolvedJob, setup: Sequence[str] = (), extra: Mapping[str, object] | None = None
) -> dict[str, Any]:
    """submitit ``SlurmExecutor.update_parameters`` keywords for ``job``; ``extra`` adds sbatch options
    (``{"hold": True}`` -> ``#SBATCH --hold``). ``request.output`` is not used: submitit owns the logs."""
    req = job.request
    additional: dict[str, object] = {"time": seconds_to_slurm(job.time_s), **_placement(job)}
    if job.preemptible or job.requeue:
        additional["requeue"] = True
    if req.hold:
        additional["hold"] = True
    params: dict[str, Any] = {
        "job_name": req.name,
        "partition": job.partition,
        "qos": job.qos,
        "time": max(1, math.ceil(job.time_s / 60)),  # minutes, for submitit's timeout count only
        "nodes": req.nodes,
        "ntasks_per_node": req.tasks_per_node,
        "comment": job.tag,
        "setup": [*env_setup_lines(job.env), *setup],
        "additional_parameters": {**additional, **(extra or {})},  # "time" here wins: exact seconds
    }
    if job.grace_s > 0:
        params["signal_delay_s"] = job.grace_s
    optional = {
        "gres": req.gres or (f"gpu:{req.gpus_per_node}" if req.gpus_per_node else None),
        "cpus_per_task": req.cpus_per_task,
        "account": req.account,
        "array_parallelism": array_parallelism(req.array),
    }
    return params | {key: value for key, value in optional.items() if value is not None}


def _placement(job: ResolvedJob) -> dict[str, object]:
    placed = {
        "nodelist": hostlists.collect(job.nodelist),
        "switches": job.switches,
        "constraint": job.constraint,
    }
    return {key: value for key, value in placed.items() if value}


def resolve_callable(target: str, app_dir: str | Path | None = ".") -> Callable[..., Any]:
    """``"pkg.mod:func"`` (or ``"pkg.mod:Class.method"``) -> the object. ``app_dir`` (default: the current
    directory) is put on sys.path first, as uvicorn does, so a module next to the user is found; the job
    finds it too (see ``import_root``). Every failure is a one-line ``ValidationError``."""
    module_name, _, attr = target.partition(":")
    if not _DOTTED.match(module_name) or not _DOTTED.match(attr):
        raise ValidationError(f"callable {target!r}: expected MODULE:FUNCTION (fix: e.g. mypkg.train:main)")
    if app_dir is not None and str(Path(app_dir).resolve()) not in sys.path:
        sys.path.insert(0, str(Path(app_dir).resolve()))
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as exc:  # an ImportError, or whatever the module raises at import
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ValidationError(
            f"callable {target!r}: cannot import {module_name!r}: {reason} (fix: check the name; "
            "the module must be importable from here and from the nodes)"
        ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValidationError(f"callable {target!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValidationError(f"callable {target!r}: {attr!r} is a {type(obj).__name__}, not callable")
    return obj


# ---------------------------------------------------------------------------------------------- act
class CallableSubmitter:
    """Submits callables; sbatch runs through ``client`` (default: ``CliSlurmClient`` over the runner).

    ``extra_sbatch`` adds options to every job (``{"hold": True}``); ``max_timeouts`` is how often a
    ``Checkpointable`` is requeued after reaching its time limit (preemptions are not counted).
    """

    def __init__(
        self,
        client: Sbatch | None = None,
        *,
        extra_sbatch: Mapping[str, object] | None = None,
        max_timeouts: int = DEFAULT_MAX_TIMEOUTS,
    ) -> None:
        if client is None:
            from hpcserve.slurm.cli_backend import CliSlurmClient

            client = CliSlurmClient()
        self._client = client
        self._extra = dict(extra_sbatch or {})
        self._max_timeouts = max_timeouts

    def executor(self, job: ResolvedJob, fn: Callable[..., Any], folder: Path) -> submitit.SlurmExecutor:
        """A fresh submitit executor for ``job`` (fresh, so submitit's throttle never finds a recent job)."""
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=self._max_timeouts)
        executor.update_parameters(**executor_parameters(job, pythonpath_lines(fn), self._extra))
        return executor

    def submit(
        self, job: ResolvedJob, fn: Callable[..., Any], *args: Any, folder: Path, **kwargs: Any
    ) -> submitit.Job[Any]:
        """``fn(*args, **kwargs)`` as one job: one pickle, one sbatch, no sleep."""
        if job.request.array:
            raise ValidationError(f"job {job.request.name!r} asks for --array: use submit_array for sweeps")
        executor = self.executor(job, fn, folder)
        pickle = _stage(executor, DelayedSubmission(_for_tasks(job, fn), *args, **kwargs))
        script = executor._make_submission_file_text(executor._submitit_command_str, pickle.stem)
        try:
            job_id = self._client.submit(script)
        except BaseException:
            pickle.unlink(missing_ok=True)
            raise
        return _job(executor, job_id, pickle, script)

    def submit_array(
        self, job: ResolvedJob, fn: Callable[..., Any], arg_lists: Sequence[tuple[Any, ...]], folder: Path
    ) -> list[submitit.Job[Any]]:
        """``fn(*args)`` for each item, as ONE Slurm job array (submitit's ``batch()``: one sbatch)."""
        if not arg_lists:
            raise ValidationError(f"job {job.request.name!r}: empty sweep (fix: give one item or more)")
        executor = self.executor(job, fn, folder)
        try:
            with executor.batch():
                call = _for_tasks(job, fn)
                jobs = [executor.submit(call, *args) for args in arg_lists]
        except FailedJobError as exc:  # submitit ran sbatch itself and it failed
            raise SlurmCommandError(["sbatch", f"--array=0-{len(arg_lists) - 1}"], 1, str(exc)) from exc
        return jobs


def _for_tasks(job: ResolvedJob, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` itself for a one-task job; wrapped to see the torch.distributed env when there are more; and
    wrapped to report its GPUs (``hpcserve.telemetry``) when it has some, unless HPCSERVE_TELEMETRY=0."""
    if job.request.nodes * job.request.tasks_per_node > 1:
        from hpcserve.jobs.distributed import WithTorchEnv

        fn = WithTorchEnv(fn)
    if job.request.gpus_per_node:
        from hpcserve.telemetry.injob import WithTelemetry, wanted

        fn = WithTelemetry(fn) if wanted(job.env) else fn
    return fn


def _stage(executor: submitit.SlurmExecutor, delayed: DelayedSubmission) -> Path:
    """Dump the call where submitit keeps pickles until the job id is known."""
    delayed.set_timeout(executor.parameters["time"], executor.max_num_timeout)
    staging = JobPaths.get_first_id_independent_folder(executor.folder)
    staging.mkdir(parents=True, exist_ok=True)
    pickle = staging / f"{uuid.uuid4().hex}.pkl"
    delayed.dump(pickle)
    return pickle


def _job(executor: submitit.SlurmExecutor, job_id: str, pickle: Path, script: str) -> submitit.Job[Any]:
    """The submitit job object, with its files where submitit's job side looks for them. The job waits up to
    60 s for its pickle, so it may start before the pickle is moved into place."""
    tasks = list(range(executor._num_tasks()))
    job: submitit.Job[Any] = submitit.SlurmJob(folder=executor.folder, job_id=job_id, tasks=tasks)
    job.paths.move_temporary_file(pickle, "submitted_pickle")
    job.paths.submission_file.write_text(script)  # for the user's eyes only, as submitit keeps it
    return job


def submit_resolved(
    job: ResolvedJob, fn: Callable[..., Any], *args: Any, folder: Path, **kwargs: Any
) -> submitit.Job[Any]:
    """Run ``fn(*args, **kwargs)`` as the Slurm job ``job`` describes; ``folder`` (shared with the nodes, may
    hold ``%j``) keeps the pickles and logs. ``job.result()`` waits for the value."""
    return CallableSubmitter().submit(job, fn, *args, folder=folder, **kwargs)


def submit_array(
    job: ResolvedJob, fn: Callable[..., Any], arg_lists: Sequence[tuple[Any, ...]], folder: Path
) -> list[submitit.Job[Any]]:
    """Run ``fn(*args)`` for each ``args`` in ``arg_lists`` as one job array; one submitit job per item.
    A ``%N`` in ``job.request.array`` limits how many run at once; the array's size is ``len(arg_lists)``."""
    return CallableSubmitter().submit_array(job, fn, arg_lists, folder)
