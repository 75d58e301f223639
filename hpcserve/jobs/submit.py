"""Submission: request -> policy -> placement -> sbatch (templates) or submitit (callables).

``plan`` is pure (a request, the policy, a snapshot and the fabric topology in; a ``ResolvedJob`` out).
``Submitter`` is the edge: it reads the cluster once, then plans and submits many jobs against that view,
counting what it submitted toward each user's GPU limit.

``Submitter.submit_owned`` submits a callable for ANOTHER user (a replica's owner): the submitit pickle and
the sbatch script are made in memory (``stage_callable``), an injected writer (a process of the owner) puts
the files in the owner's folder, and an injected ``sbatch`` (a client whose runner runs as the owner) submits.
The pickle is written under a staging name; the job script itself (running as the owner) moves it to
``<job id>_submitted.pkl``, where submitit's job side reads it, so nothing is left to do after sbatch.
"""

from __future__ import annotations

import dataclasses
import pickle
import shlex
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcserve.jobs.policy import array_size, gpus_in_use, resolve, shard_gpus
from hpcserve.jobs.spec import JobRequest, ResolvedJob
from hpcserve.placement import FabricTopology, PlacementRequest, build_fabric_topology, select_nodes
from hpcserve.placement.shards import choose_shard_node, shard_count

if TYPE_CHECKING:
    import submitit

    from hpcserve.config import Policy, SiteConfig
    from hpcserve.jobs.callables import Sbatch
    from hpcserve.jobs.templates import Template
    from hpcserve.slurm.models import ClusterSnapshot
    from hpcserve.slurm.protocol import SlurmClient


@dataclass(frozen=True, slots=True)
class PlannedJob:
    """A job ready for sbatch: the resolved options, why its nodes were chosen, and the script if any."""

    job: ResolvedJob
    placement: str  # a sentence: which nodes and why, or why Slurm chooses
    script: str | None = None

    def sbatch_args(self) -> list[str]:
        return self.job.sbatch_args()


@dataclass(frozen=True, slots=True)
class JobFiles:
    """A callable's job as bytes: its sbatch script, and the files beside it in the job's folder."""

    script: str
    files: dict[str, bytes]


def stage_callable(job: ResolvedJob, fn: Callable[..., Any], args: Sequence[Any], folder: Path) -> JobFiles:
    """submitit's script and pickle for ``fn(*args)`` as ``job``, with ``folder`` (no ``%j``) as the job's
    working directory and submitit folder; nothing is written."""
    import cloudpickle  # type: ignore[import-untyped]
    import submitit
    from submitit.core.utils import DelayedSubmission

    from hpcserve.jobs.callables import DEFAULT_MAX_TIMEOUTS, executor_parameters, pythonpath_lines

    staged = f"{uuid.uuid4().hex}.pkl"
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=DEFAULT_MAX_TIMEOUTS)
    setup = [*pythonpath_lines(fn), *claim_pickle_lines(folder, staged)]
    executor.update_parameters(**executor_parameters(job, setup, {"chdir": str(folder)}))
    delayed = DelayedSubmission(_for_tasks(job, fn), *args)
    delayed.set_timeout(executor.parameters["time"], executor.max_num_timeout)
    script = executor._make_submission_file_text(executor._submitit_command_str, staged.removesuffix(".pkl"))
    return JobFiles(script, {staged: cloudpickle.dumps(delayed, pickle.HIGHEST_PROTOCOL)})


def claim_pickle_lines(folder: Path, staged: str) -> list[str]:
    """Script lines that move the staged pickle to where submitit's job side looks for it (a requeued run
    finds it there already)."""
    src, dst = (
        shlex.quote(str(folder / staged)),
        shlex.quote(str(folder)) + '/"${SLURM_JOB_ID}_submitted.pkl"',
    )
    return [f"if [ -e {src} ]; then mv -f -- {src} {dst}; fi"]


def _for_tasks(job: ResolvedJob, fn: Callable[..., Any]) -> Callable[..., Any]:
    if job.request.nodes * job.request.tasks_per_node > 1:
        from hpcserve.jobs.distributed import WithTorchEnv

        return WithTorchEnv(fn)
    return fn


def place(
    job: ResolvedJob,
    snapshot: ClusterSnapshot,
    topology: FabricTopology,
    degraded: frozenset[str] = frozenset(),
    submitted_shards: Mapping[str, int] | None = None,
) -> tuple[ResolvedJob, str]:
    """Choose nodes for a multi-node job (same leaf, one fabric island, best fit, no degraded node) and
    its NCCL env. A one-node job needs no network between nodes, so Slurm's own best fit chooses its node;
    but a job on GPU shards goes where shards pack onto the fewest GPUs (``placement.shards``).
    """
    req = job.request
    shards = shard_count(req.gres)
    if req.nodes < 2 and shards:
        return _place_shards(job, shards, snapshot, degraded, submitted_shards)
    if req.nodes < 2:
        return job, "one node: Slurm chooses it"
    partition = snapshot.partition(job.partition)
    candidates = frozenset(partition.nodes) if partition is not None else None
    placement = select_nodes(
        PlacementRequest(
            nodes=req.nodes, gpus_per_node=req.gpus_per_node, candidates=candidates, degraded=degraded
        ),
        snapshot,
        topology,
    )
    placed = dataclasses.replace(
        job,
        nodelist=placement.nodes,
        switches=placement.switches,
        constraint=placement.constraint,
        env={**placement.env, **job.env},
    )
    return placed, placement.reason


def _place_shards(
    job: ResolvedJob,
    shards: int,
    snapshot: ClusterSnapshot,
    degraded: frozenset[str],
    submitted_shards: Mapping[str, int] | None,
) -> tuple[ResolvedJob, str]:
    partition = snapshot.partition(job.partition)
    candidates = frozenset(partition.nodes) - degraded if partition is not None else None
    choice = choose_shard_node(shards, snapshot.nodes, candidates, submitted_shards)
    if choice is None:
        return job, f"shard:{shards}: no node has that many free shards now: Slurm chooses, the job waits"
    return dataclasses.replace(job, nodelist=(choice.node,)), choice.reason


def plan(
    request: JobRequest,
    policy: Policy,
    snapshot: ClusterSnapshot,
    topology: FabricTopology,
    *,
    kind: str,
    gpus_used: float | None = None,
    degraded: frozenset[str] = frozenset(),
    submitted_shards: Mapping[str, int] | None = None,
    shards_per_gpu: int = 0,
) -> tuple[ResolvedJob, str]:
    """Policy, then placement. ``gpus_used`` defaults to the user's live jobs in the snapshot; with
    ``shards_per_gpu``, GPU shards count as parts of a GPU (``gpus_in_use``)."""
    used = gpus_in_use(snapshot.jobs, request.user, shards_per_gpu) if gpus_used is None else gpus_used
    resolved = resolve(request, policy, used, kind=kind, shards_per_gpu=shards_per_gpu)
    return place(resolved, snapshot, topology, degraded, submitted_shards)


def with_marker_dir(job: ResolvedJob, folder: Path | None) -> ResolvedJob:
    """A preemptible job gets ``$HPCSERVE_CHECKPOINT_DIR`` (the site's ``lending.checkpoint_dir``), where its
    template or ``ResumableTask`` touches ``<job id>`` at each checkpoint, so ``lending: overlap`` can evict
    the jobs that saved most recently first. A value the user set is kept."""
    from hpcserve.jobs.resumable import MARKER_DIR_ENV

    if folder is None or not job.preemptible or MARKER_DIR_ENV in job.env:
        return job
    return dataclasses.replace(job, env={**job.env, MARKER_DIR_ENV: str(folder)})


class Submitter:
    """Plans and submits jobs against one view of the cluster, read on first use. ``degraded`` nodes (the
    last NCCL probe's verdict, see ``hpcserve.jobs.probe``) are never placed on."""

    def __init__(
        self, client: SlurmClient, site: SiteConfig, policy: Policy, degraded: frozenset[str] = frozenset()
    ) -> None:
        self._client, self._site, self._policy, self._degraded = client, site, policy, degraded
        self._view: tuple[ClusterSnapshot, FabricTopology] | None = None
        self._submitted_gpus: dict[str, float] = defaultdict(float)
        self._submitted_shards: dict[str, int] = defaultdict(int)  # per node, not in the view yet

    def view(self) -> tuple[ClusterSnapshot, FabricTopology]:
        if self._view is None:
            snapshot = self._client.snapshot()
            self._view = snapshot, build_fabric_topology(snapshot.topology, self._site)
        return self._view

    def plan(self, request: JobRequest, *, kind: str) -> tuple[ResolvedJob, str]:
        snapshot, topology = self.view()
        per_gpu = self._site.serving.shards_per_gpu
        used = gpus_in_use(snapshot.jobs, request.user, per_gpu) + self._submitted_gpus[request.user]
        job, reason = plan(request, self._policy, snapshot, topology, kind=kind, gpus_used=used,
                           degraded=self._degraded, submitted_shards=self._submitted_shards,
                           shards_per_gpu=per_gpu)  # fmt: skip
        return with_marker_dir(job, self._site.lending.checkpoint_dir), reason

    def plan_template(self, template: Template, values: Mapping[str, str], request: JobRequest) -> PlannedJob:
        """The exact script and sbatch options a template submission would use."""
        from hpcserve.jobs.templates import render, validate_params

        checked = validate_params(template, values)
        job, reason = self.plan(request, kind="template")
        return PlannedJob(job, reason, render(template, checked, env=job.env))

    def submit(self, planned: PlannedJob) -> str:
        """sbatch the planned script; returns the job id."""
        if planned.script is None:
            raise ValueError("only template jobs carry a script; use submit_callable for callables")
        job_id = self._client.submit(planned.script, planned.sbatch_args())
        self._count(planned.job.request)
        return job_id

    def submit_callable(
        self,
        request: JobRequest,
        fn: Callable[..., Any],
        args: Sequence[Any],
        folder: Path,
        sweep: Sequence[tuple[Any, ...]] | None = None,
        *,
        kind: str = "train",
        tag: str | None = None,
        requeue: bool = False,
    ) -> tuple[list[submitit.Job[Any]], PlannedJob]:
        """Submit ``fn(*args)`` through submitit, or ``fn(*a)`` for each ``a`` in ``sweep`` as one array.
        ``tag`` replaces hpcserve's default ``hpcserve:<kind>:<name>`` marker."""
        from hpcserve.jobs.callables import submit_array, submit_resolved

        if sweep is not None:
            request = dataclasses.replace(request, array=f"0-{len(sweep) - 1}")
        job, reason = self.plan(request, kind=kind)
        job = dataclasses.replace(job, tag=tag or job.tag, requeue=requeue or job.requeue)
        if sweep is not None:
            jobs = submit_array(job, fn, list(sweep), folder)
        else:
            jobs = [submit_resolved(job, fn, *args, folder=folder)]
        self._count(request)
        return jobs, PlannedJob(job, reason)

    def submit_owned(
        self,
        request: JobRequest,
        fn: Callable[..., Any],
        args: Sequence[Any],
        folder: Path,
        *,
        write: Callable[[Mapping[str, bytes]], None],
        sbatch: Sbatch,
        kind: str = "train",
        tag: str | None = None,
        requeue: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> tuple[str, PlannedJob]:
        """Submit ``fn(*args)`` as ``request.user``: the policy first (the user's own limits), then
        ``write(files)`` puts the pickle into ``folder`` (as the user), then ``sbatch`` (as the user) submits
        the script, which exports ``env`` (the site's ``serving.replica_env``). Returns the job id."""
        job, reason = self.plan(request, kind=kind)
        job = dataclasses.replace(job, tag=tag or job.tag, requeue=requeue or job.requeue,
                                  env={**job.env, **(env or {})})  # fmt: skip
        staged = stage_callable(job, fn, args, folder)
        write(staged.files)
        job_id = sbatch.submit(staged.script)
        self._count(request, job.nodelist)
        return job_id, PlannedJob(job, reason, staged.script)

    def _count(self, request: JobRequest, nodelist: Sequence[str] = ()) -> None:
        shards = shard_count(request.gres)
        part = shard_gpus(shards or 0, self._site.serving.shards_per_gpu)
        self._submitted_gpus[request.user] += (request.gpus + part) * array_size(request.array)
        if shards and len(nodelist) == 1:
            self._submitted_shards[nodelist[0]] += shards
