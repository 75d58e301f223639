"""Optional read backend over pyslurm 25.11 (extra ``hpcserve[pyslurm]``) for Slurm 25.11 sites.

pyslurm is on PyPI only for Slurm 25.11 (and < 19): it cannot run on this project's Slurm 22.05 cluster
or in CI, where ``slurm.backend: cli`` is used. Attributes verified in PySlurm/pyslurm at commit 85aac8f8
(25.11 era; docs/migration.md), not guessed:

- pyslurm/__init__.py: top-level ``Jobs``, ``Nodes``, ``Partitions``, ``RPCError``, ``slurmctld``.
- pyslurm/core/job/job.pyx: ``Jobs.load().values()``; Job ``id``, ``name``, ``user_name`` (KeyError for an
  unknown uid), ``user_id``, ``account``, ``partition``, ``qos``, ``state``, ``state_reason`` (the word
  ``None`` if none), ``num_nodes``, ``allocated_nodes`` (hostlist), ``submit_time``/``start_time`` (epoch
  or None), ``time_limit`` (minutes, None if unlimited), ``comment``, ``array_id``, ``array_task_id``
  (None for task 0: u32_parse treats 0 as unset), ``array_tasks_waiting`` (``0-9``, ``%N`` stripped),
  ``gres_per_node`` (to_gres_dict of tres_per_node: ``{"gres/gpu:h100": 2}``; GPUs asked with --gpus,
  i.e. tres_per_job, are not exposed there and count 0).
- pyslurm/core/node.pyx: ``Nodes.load()``; Node ``name``, ``state`` (``IDLE+DRAIN``), ``partitions``,
  ``configured_gres`` (``{"gpu:h100": 4}``), ``allocated_gres`` (``{"gpu": 2, "gpu:h100": 2}``: total and
  typed), ``available_features``, ``total_cpus``, ``allocated_cpus``, ``real_memory``,
  ``allocated_memory``, ``address``, ``reason``.
- pyslurm/core/partition.pyx: ``Partitions.load()``; ``name``, ``nodes``, ``state``, ``is_default``,
  ``max_time``/``default_time`` (minutes, ``"UNLIMITED"`` or None), ``priority_tier`` (None for 0),
  ``preempt_mode``; no TRES, so ``total_gpus`` is summed from the nodes.
- pyslurm/core/slurmctld/base.pyx: ``slurmctld.ping_primary()``: ``is_responding``, ``hostname``, ``latency``.
- Topology: 25.05 removed ``pyslurm.topology`` with no replacement (CHANGELOG.md) and 25.11 adds none, so
  it is read through the delegate (the CLI backend), as are all writes; without a delegate it is empty.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from hpcserve.errors import HpcserveError, SlurmParseError
from hpcserve.hostlists import expand
from hpcserve.model.usage import GpuAllocation
from hpcserve.slurm.models import (
    AccountingRecord,
    ClusterSnapshot,
    Job,
    JobState,
    Node,
    Partition,
    Topology,
    tag_of,
    wait_of,
    with_switches,
)
from hpcserve.slurm.protocol import JobFilter, Ping, SlurmClient
from hpcserve.slurm.timefmt import parse_epoch

_utcnow = functools.partial(datetime.now, UTC)
_NULL = frozenset({"", "(null)", "N/A", "None"})
_STATE_CODES = {
    "PD": "PENDING", "R": "RUNNING", "CG": "COMPLETING", "CF": "CONFIGURING", "S": "SUSPENDED",
    "CD": "COMPLETED", "CA": "CANCELLED", "F": "FAILED", "TO": "TIMEOUT", "PR": "PREEMPTED",
    "NF": "NODE_FAIL", "OOM": "OUT_OF_MEMORY", "BF": "BOOT_FAIL", "DL": "DEADLINE",
}  # fmt: skip


def import_pyslurm() -> Any:
    """The pyslurm module, or a one-line HpcserveError that says to use the CLI backend."""
    try:
        return importlib.import_module("pyslurm")
    except ImportError as exc:
        cause = (str(exc).splitlines() or ["not installed"])[0]
        raise HpcserveError(
            f"pyslurm cannot be imported ({cause}): it is published only for Slurm 25.11 "
            "(pip install 'hpcserve[pyslurm]' there); on other Slurm versions set `slurm.backend: cli`"
        ) from exc


def _text(value: Any) -> str:
    return "" if value is None or str(value) in _NULL else str(value)


def _int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _count(value: Any) -> int:
    if isinstance(value, Mapping):  # {"count": 2, "indexes": "0-1"} when Slurm gave IDX
        value = value.get("count")
    return int(value) if isinstance(value, str) and value.isdigit() else _int(value)


def _gpu_entries(gres: Any) -> list[tuple[str | None, int]]:
    """(type, count) of each GPU entry of a pyslurm GRES dict: keys gpu, gpu:h100 or gres/gpu:h100."""
    entries = []
    for key, value in dict(gres or {}).items():
        name, _, typ = str(key).removeprefix("gres/").removeprefix("gres:").partition(":")
        if name == "gpu":
            entries.append((typ or None, _count(value)))
    return entries


def gpu_count(gres: Any) -> int:
    """The untyped ``gpu`` total when present (TRES lists it beside the typed ones), else the typed sum."""
    entries = _gpu_entries(gres)
    untyped = [n for typ, n in entries if typ is None]
    return untyped[0] if untyped else sum(n for _, n in entries)


def _gpu_type(gres: Any) -> str | None:
    return next((typ for typ, _ in _gpu_entries(gres) if typ), None)


def _minutes_to_s(value: Any) -> int | None:
    """pyslurm times in minutes; ``"UNLIMITED"`` and None -> None."""
    return value * 60 if isinstance(value, int) and not isinstance(value, bool) else None


def node_from_pyslurm(obj: Any) -> Node:
    base, *flags = (_text(obj.state) or "UNKNOWN").split("+")
    return Node(
        name=str(obj.name),
        state=base.lower(),
        flags=frozenset(f.upper() for f in flags),
        partitions=tuple(obj.partitions or ()),
        gpus_total=gpu_count(obj.configured_gres),
        gpus_alloc=gpu_count(obj.allocated_gres),
        gpu_type=_gpu_type(obj.configured_gres),
        features=tuple(obj.available_features or ()),
        cpus_total=_int(obj.total_cpus),
        cpus_alloc=_int(obj.allocated_cpus),
        memory_mb=_int(obj.real_memory),
        memory_alloc_mb=_int(obj.allocated_memory),
        address=_text(obj.address),
        reason=_text(obj.reason),
    )


def _user(obj: Any) -> str:
    try:
        name = obj.user_name
    except KeyError:  # uid without a passwd entry on this host
        name = None
    return _text(name) or _text(getattr(obj, "user_id", None))


def _display_id(obj: Any) -> str:
    """``123``; ``123_4`` for an array task; ``123_[0-9]`` for a pending array's unsplit tasks."""
    if not obj.array_id:
        return str(obj.id)
    if obj.array_tasks_waiting:
        return f"{obj.array_id}_[{obj.array_tasks_waiting}]"
    return f"{obj.array_id}_{obj.array_task_id or 0}"


def job_from_pyslurm(obj: Any, now: datetime) -> Job:
    num_nodes, state = _int(obj.num_nodes), JobState.parse(_text(obj.state) or "UNKNOWN")
    submit, start, comment = parse_epoch(obj.submit_time), parse_epoch(obj.start_time), _text(obj.comment)
    return Job(
        id=_display_id(obj),
        job_id=int(obj.id),
        name=_text(obj.name),
        user=_user(obj),
        account=_text(obj.account),
        partition=_text(obj.partition),
        state=state,
        num_nodes=num_nodes,
        nodes=expand(_text(obj.allocated_nodes)),
        gpus=gpu_count(obj.gres_per_node) * max(num_nodes, 1),
        qos=_text(obj.qos),
        submit=submit,
        start=start,
        time_limit_s=_minutes_to_s(obj.time_limit),
        reason=_text(obj.state_reason),
        comment=comment,
        tag=tag_of(comment),
        wait_s=wait_of(state, submit, start, now),
    )


def array_task_ids(text: str) -> tuple[int, ...]:
    """``0-3,7,10-20:5`` -> (0, 1, 2, 3, 7, 10, 15, 20)."""
    ids: list[int] = []
    try:
        for part in text.split(","):
            span, _, step = part.partition(":")
            first, _, last = span.partition("-")
            ids.extend(range(int(first), int(last or first) + 1, int(step or 1)))
    except ValueError as exc:
        raise SlurmParseError(f"pyslurm: array task list {text!r} is not like 0-9,12 ({exc})") from exc
    return tuple(ids)


def jobs_from_pyslurm(objs: Iterable[Any], now: datetime) -> list[Job]:
    """One Job per array task, as ``squeue -r`` lists them (the CLI backend does the same)."""
    jobs = []
    for obj in objs:
        job = job_from_pyslurm(obj, now)
        waiting = _text(obj.array_tasks_waiting) if obj.array_id else ""
        tasks = array_task_ids(waiting) if waiting else ()
        jobs += [msgspec.structs.replace(job, id=f"{obj.array_id}_{t}") for t in tasks] or [job]
    return jobs


def partition_from_pyslurm(obj: Any, node_gpus: Mapping[str, int] | None = None) -> Partition:
    nodes = expand(_text(obj.nodes))
    return Partition(
        name=str(obj.name),
        nodes=nodes,
        state=_text(obj.state) or "UP",
        default=bool(obj.is_default),
        max_time_s=_minutes_to_s(obj.max_time),
        default_time_s=_minutes_to_s(obj.default_time),
        priority_tier=_int(obj.priority_tier),
        preempt_mode=_text(obj.preempt_mode),
        total_gpus=sum((node_gpus or {}).get(n, 0) for n in nodes),
    )


def _wanted_states(states: Sequence[str]) -> frozenset[JobState] | None:
    """None: every state (``all``); empty filter: every non-terminal state, as squeue shows by default."""
    words = [s.strip().upper() for s in states]
    if "ALL" in words:
        return None
    if not words:
        return frozenset(s for s in JobState if not s.is_terminal)
    return frozenset(JobState.parse(_STATE_CODES.get(w, w)) for w in words)


def _matches(job: Job, filt: JobFilter, states: frozenset[JobState] | None) -> bool:
    ids = {job.id, str(job.job_id), job.id.partition("_")[0]}
    return (
        (states is None or job.state in states)
        and (not filt.user or job.user == filt.user)
        and (not filt.partitions or bool(set(job.partition.split(",")) & set(filt.partitions)))
        and (not filt.job_ids or bool(ids & set(filt.job_ids)))
    )


def filter_jobs(jobs: Iterable[Job], filt: JobFilter) -> list[Job]:
    """JobFilter applied client-side (pyslurm loads every job in one RPC)."""
    states = _wanted_states(filt.states)
    return [j for j in jobs if _matches(j, filt, states)]


class PyslurmClient:
    """SlurmClient whose reads go through pyslurm 25.11 and whose writes go to ``delegate``."""

    def __init__(
        self,
        delegate: SlurmClient | None = None,
        *,
        module: Any = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._ps: Any = module if module is not None else import_pyslurm()
        self._delegate = delegate
        self._clock = clock

    def _load(self, kind: str) -> list[Any]:
        try:
            return list(getattr(self._ps, kind).load().values())
        except self._ps.RPCError as exc:
            raise HpcserveError(
                f"pyslurm.{kind}.load() failed: {exc} (is slurmctld up? `scontrol ping`)"
            ) from exc

    def _writer(self, what: str) -> SlurmClient:
        if self._delegate is None:
            raise HpcserveError(
                f"the pyslurm backend only reads: {what} needs PyslurmClient(delegate=CliSlurmClient()) "
                "(or set `slurm.backend: cli`)"
            )
        return self._delegate

    def ping(self) -> Ping:
        try:
            resp = self._ps.slurmctld.ping_primary()
        except self._ps.RPCError as exc:
            return Ping(False, str(exc))
        return Ping(bool(resp.is_responding), f"{resp.hostname} answered in {resp.latency} ms (pyslurm)")

    def jobs(self, filt: JobFilter | None = None) -> list[Job]:
        return filter_jobs(jobs_from_pyslurm(self._load("Jobs"), self._clock()), filt or JobFilter())

    def nodes(self) -> list[Node]:
        return [node_from_pyslurm(n) for n in self._load("Nodes")]

    def partitions(self, nodes: Iterable[Node] | None = None) -> list[Partition]:
        gpus = {n.name: n.gpus_total for n in (self.nodes() if nodes is None else nodes)}
        return [partition_from_pyslurm(p, gpus) for p in self._load("Partitions")]

    def topology(self) -> Topology:
        return self._delegate.topology() if self._delegate is not None else Topology()

    def snapshot(self) -> ClusterSnapshot:
        at = self._clock()
        topology = self.topology()
        nodes = self.nodes()
        return ClusterSnapshot(
            at=at,
            nodes=with_switches(nodes, topology),
            jobs=tuple(self.jobs()),
            partitions=tuple(self.partitions(nodes)),
            topology=topology,
        )

    def accounting(self, job_ids: Iterable[str]) -> list[AccountingRecord]:
        return self._writer("accounting").accounting(job_ids)

    def gpu_allocations(self, since: datetime, until: datetime, user: str | None) -> list[GpuAllocation]:
        from hpcserve.slurm.protocol import UsageReader

        reader = self._writer("gpu_allocations")
        if not isinstance(reader, UsageReader):
            raise HpcserveError("usage needs the CLI backend's sacct read (set `slurm.backend: cli`)")
        return reader.gpu_allocations(since, until, user)

    def submit(self, script: str, sbatch_args: Sequence[str] = ()) -> str:
        return self._writer("submit").submit(script, sbatch_args)

    def cancel(self, job_ids: Iterable[str], *, signal: str | None = None) -> None:
        self._writer("cancel").cancel(job_ids, signal=signal)
