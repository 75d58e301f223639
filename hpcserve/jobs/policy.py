"""The policy check: a ``JobRequest`` plus the user's current usage -> a ``ResolvedJob``, or a refusal that
names the rule. Pure: it reads no clock, no Slurm and no files, so it runs before anything reaches Slurm."""

from __future__ import annotations

import re
from collections.abc import Iterable

from hpcserve.config.policy import JobClass, Policy
from hpcserve.errors import ValidationError
from hpcserve.jobs.spec import JobRequest, ResolvedJob, make_tag, seconds_to_slurm
from hpcserve.model.cluster import Job
from hpcserve.placement.shards import shard_count, shards_for

_ARRAY_ITEM = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+))?)?$")


class PolicyViolation(ValidationError):
    """A request that breaks a rule of the policy; the message names the rule (``classes.X.field``)."""

    def __init__(self, job_class: str, field: str, problem: str, fix: str) -> None:
        super().__init__(f"policy classes.{job_class}.{field}: {problem} (fix: {fix})")
        self.rule = f"classes.{job_class}.{field}"


def array_size(spec: str | None) -> int:
    """How many tasks of an ``--array`` run at once: ``0-9`` -> 10, ``1,3,5`` -> 3, ``0-99%10`` -> 10."""
    if not spec:
        return 1
    items, _, limit = spec.partition("%")
    total = 0
    for item in items.split(","):
        match = _ARRAY_ITEM.match(item.strip())
        if match is None:
            raise ValidationError(
                f"--array: {spec!r} is not an array spec (fix: write e.g. 0-9, 1,3,5, 0-20:2 or 0-99%10)"
            )
        first, last, step = int(match[1]), int(match[2] or match[1]), int(match[3] or 1)
        if last < first or step < 1:
            raise ValidationError(
                f"--array: {item!r} is an empty range (fix: write FIRST-LAST with FIRST<=LAST)"
            )
        total += (last - first) // step + 1
    if limit:
        if not limit.isdigit() or int(limit) < 1:
            raise ValidationError(f"--array: bad limit %{limit} (fix: a positive number after %)")
        return min(total, int(limit))
    return total


def check_name(name: str) -> None:
    """Job names go to sbatch as one argv item, so quotes, ``;`` and ``$( )`` are harmless; control
    characters are not: squeue and sacct print one job per line, and a newline would forge a second one."""
    if not name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValidationError(
            f"-J/--job-name: {name!r} is empty or holds a control character such as a newline "
            "(fix: use one line of printable text)"
        )


def shard_gpus(shards: int, shards_per_gpu: int) -> float:
    """``shards`` of gres/shard as the part of a GPU they are (0 when shards are not counted)."""
    return shards / shards_per_gpu if shards_per_gpu > 0 else 0.0


def part_gpus(gpus: int, fraction: float | None, shards_per_gpu: int) -> float:
    """GPUs one replica holds: ``gpus`` whole ones, or for a ``fraction`` of one GPU the shards it takes
    (``placement.shards.shards_for``: 0.25 of a GPU cut in 4 is one shard, 0.25 GPU), counted as squeue's
    shards are (``gpus_in_use``)."""
    if fraction:
        return shard_gpus(shards_for(fraction, shards_per_gpu), shards_per_gpu)
    return float(gpus)


def gpus_in_use(jobs: Iterable[Job], user: str, shards_per_gpu: int = 0) -> float:
    """GPUs a user's queued and running jobs hold or ask for: whole GPUs, and with ``shards_per_gpu`` their
    GPU shards as parts of a GPU (a job on one shard of four: 0.25)."""
    return sum(j.gpus + shard_gpus(j.shards, shards_per_gpu) for j in jobs
               if j.user == user and not j.state.is_terminal)  # fmt: skip


def resolve(
    request: JobRequest, policy: Policy, gpus_used: float = 0, kind: str = "job", shards_per_gpu: int = 0
) -> ResolvedJob:
    """Apply the request's job class: partition, QoS, limits, preemption. Raises ``PolicyViolation``.

    ``gpus_used`` is what the user already holds or waits for (see ``gpus_in_use``); ``kind`` goes into
    hpcserve's tag (``hpcserve:<kind>:<name>``); with ``shards_per_gpu``, a request for GPU shards counts
    as that part of a GPU toward ``max_gpus_per_user``.
    """
    check_name(request.name)
    rules = policy.for_class(request.job_class)
    name = request.job_class.value
    _check_partition(request, rules, name)
    _check_gpus(request, rules, name, gpus_used, shards_per_gpu)
    time_s = _check_time(request, rules, name)
    return ResolvedJob(
        request=request,
        partition=rules.partition,
        qos=rules.qos,
        time_s=time_s,
        preemptible=rules.preemptible,
        grace_s=rules.grace_s,
        tag=make_tag(kind, request.name),
    )


def _check_partition(request: JobRequest, rules: JobClass, name: str) -> None:
    if request.partition is not None and request.partition != rules.partition:
        raise PolicyViolation(
            name,
            "partition",
            f"{name} jobs run in partition {rules.partition!r}, not {request.partition!r}",
            f"drop -p, or pick the job class whose partition is {request.partition!r}",
        )


def _check_gpus(
    request: JobRequest, rules: JobClass, name: str, gpus_used: float, shards_per_gpu: int
) -> None:
    if request.gpus > rules.max_gpus_per_job:
        raise PolicyViolation(
            name,
            "max_gpus_per_job",
            f"{request.nodes} nodes x {request.gpus_per_node} GPUs = {request.gpus} GPUs, "
            f"at most {rules.max_gpus_per_job} per {name} job",
            f"ask for at most {rules.max_gpus_per_job} GPUs",
        )
    part = shard_gpus(shard_count(request.gres) or 0, shards_per_gpu)
    asked = (request.gpus + part) * array_size(request.array)
    if gpus_used + asked > rules.max_gpus_per_user + 1e-9:
        raise PolicyViolation(
            name,
            "max_gpus_per_user",
            f"user {request.user} holds or waits for {gpus_used:g} GPUs; {asked:g} more would pass "
            f"the limit of {rules.max_gpus_per_user}",
            "wait for your jobs to finish or cancel some (hpcserve ps --me)",
        )


def _check_time(request: JobRequest, rules: JobClass, name: str) -> int:
    if request.time_s is None:
        return rules.default_time_s
    if request.time_s <= 0:
        raise PolicyViolation(name, "max_time", "a time limit of zero", "give -t a positive duration")
    if request.time_s > rules.max_time_s:
        raise PolicyViolation(
            name,
            "max_time",
            f"-t {seconds_to_slurm(request.time_s)} is longer than {rules.max_time}",
            f"ask for at most {rules.max_time}, and checkpoint to go on in a new job",
        )
    return request.time_s


def time_option(text: str) -> int:
    """A ``-t/--time`` value -> seconds. UNLIMITED is refused: it blocks maintenance reservations."""
    from hpcserve.slurm.timefmt import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise ValidationError(f"-t/--time: {exc}") from exc
    if seconds is None:
        raise ValidationError(
            "-t/--time: UNLIMITED is never submitted: it blocks maintenance reservations "
            "(fix: give a finite limit like 2-00:00:00)"
        )
    return seconds
