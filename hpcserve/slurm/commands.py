"""Slurm command lines, built purely as argv lists (never a shell string).

Kept free of imports (not even ``re`` or ``typing`` at load time): the console entry point starts squeue
from here before anything else loads, and every millisecond before that spawn shows in ``hpcserve ps``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import cache

from hpcserve.errors import ValidationError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy treats the name the same way
if TYPE_CHECKING:
    import re

    from hpcserve.slurm.protocol import JobFilter

SEP = "\x1f"  # unit separator between the fields Slurm fills in itself
# Every byte 0x01-0xff that a user puts in --job-name or --comment, 0x1f, tab and newline included, comes
# back verbatim from squeue, sacct and scontrol (see hpcserve/slurm/parsers.py). So a record cannot be split
# on any fixed byte: squeue's records end, and its two free-text fields are parted, by SEP plus a nonce that
# no user can know. It reaches squeue through the environment (SQUEUE_FORMAT2), which other users cannot
# read, unlike the argv in /proc/PID/cmdline. One nonce per process, so the squeue that the console entry
# point starts early is parsed by the same mark.
NONCE = os.urandom(8).hex()
SQUEUE_FIELDS = (
    "JobID",
    "JobArrayID",
    "UserName",
    "Account",
    "Partition",
    "QOS",
    "State",
    "NumNodes",
    "NodeList",
    "tres-alloc",
    "SubmitTime",
    "StartTime",
    "TimeLimit",
    "Reason",
    "Name",
    "Comment",
)  # fmt: skip  Slurm's own fields first; the two a user writes last, each ended by the mark
SQUEUE_FREE_TEXT = 2
SACCT_FIELDS = (
    "JobIDRaw", "JobName", "User", "Account", "Partition", "State", "ExitCode", "NodeList", "AllocTRES",
    "Submit", "Start", "End", "ElapsedRaw",
)  # fmt: skip
# squeue reads these from the caller's environment before SQUEUE_FORMAT2 (SQUEUE_FORMAT wins over it) or
# changes how times print: unset for hpcserve's own squeue.
_SQUEUE_UNSET = ("SQUEUE_FORMAT", "SLURM_TIME_FORMAT")


def record_mark(nonce: str = NONCE) -> str:
    """What ends each free-text field: SEP first, so -O never reads the nonce's digits as a field width."""
    return SEP + nonce


def new_nonce() -> str:
    return os.urandom(8).hex()


@cache
def _job_id_pattern() -> re.Pattern[str]:
    import re

    return re.compile(r"^\d+(_(\d+|\[[\d,\-%]+\]))?$")


def is_job_id(text: str) -> bool:
    """``123``, ``123_4`` and ``123_[1-5]`` are job ids; anything else (flags, words, globs) is not."""
    return bool(_job_id_pattern().match(text))


def check_job_ids(job_ids: Iterable[str]) -> tuple[str, ...]:
    """Job ids as Slurm accepts them; anything else is refused before a command runs."""
    ids = tuple(str(j).strip() for j in job_ids)
    bad = [j for j in ids if not is_job_id(j)]
    if bad:
        raise ValidationError(f"job id {bad[0]!r} is not a Slurm job id (use 123 or 123_4)")
    if not ids:
        raise ValidationError("no job id given (pass one or more job ids, e.g. 123 124_3)")
    return ids


def squeue_format(nonce: str = NONCE) -> str:
    """The ``squeue -O`` format: Slurm's own fields unpadded, each followed by SEP; then the job name and the
    comment, each followed by the mark (so a record ends with the mark and squeue's newline)."""
    fixed = SQUEUE_FIELDS[:-SQUEUE_FREE_TEXT]
    mark = record_mark(nonce)
    return ",".join([*(f"{f}:{SEP}" for f in fixed), *(f"{f}:{mark}" for f in SQUEUE_FIELDS[len(fixed) :])])


def squeue_env(nonce: str = NONCE) -> dict[str, str | None]:
    """The changes to squeue's environment that carry the format (a value None unsets a variable)."""
    return {**dict.fromkeys(_SQUEUE_UNSET), "SQUEUE_FORMAT2": squeue_format(nonce)}


def squeue_argv(filt: JobFilter | None) -> list[str]:
    """-r lists array tasks one per line, -a includes hidden partitions; filters are squeue's own. The
    format is not here but in :func:`squeue_env`."""
    argv = ["squeue", "-h", "-a", "-r"]
    if filt is None:
        return argv
    if filt.user:
        argv.append(f"--user={filt.user}")
    if filt.states:
        argv.append(f"--states={','.join(filt.states)}")
    if filt.partitions:
        argv.append(f"--partition={','.join(filt.partitions)}")
    if filt.job_ids:
        argv.append(f"--jobs={','.join(check_job_ids(filt.job_ids))}")
    return argv


SIGNALS = frozenset({"HUP", "INT", "QUIT", "KILL", "USR1", "USR2", "TERM", "CONT", "STOP"})


def scancel_argv(job_ids: Iterable[str], signal: str | None = None) -> list[str]:
    """--verbose: a quiet scancel says nothing about an unknown job id; verbose prints an ``error:`` line."""
    argv = ["scancel", "--verbose"]
    if signal is not None:
        name = signal.upper().removeprefix("SIG")
        if name not in SIGNALS:
            raise ValidationError(
                f"signal {signal!r} is not supported (use one of {', '.join(sorted(SIGNALS))})"
            )
        argv.append(f"--signal={name}")
    return [*argv, *check_job_ids(job_ids)]


def sacct_argv(job_ids: Iterable[str], nonce: str) -> list[str]:
    """``--parsable`` (not 2) ends every field, the last one too, with the delimiter: SEP plus a fresh nonce
    per call. It is in argv, so visible while sacct runs; a job name changed in that moment can at most
    break its own job's record, which is then dropped."""
    ids = check_job_ids(job_ids)
    return ["sacct", "-n", "-X", "--parsable", f"--delimiter={record_mark(nonce)}",
            f"--format={','.join(SACCT_FIELDS)}", f"--jobs={','.join(ids)}"]  # fmt: skip


# hpcserve usage's sacct fields: the two a user writes last (slurmdbd keeps a comment only with
# AccountingStoreFlags=job_comment; without it Comment is empty)
USAGE_FIELDS = (
    "JobIDRaw", "User", "Account", "Partition", "State", "NodeList", "AllocTRES", "Start", "End",
    "ElapsedRaw", "JobName", "Comment",
)  # fmt: skip


def sacct_usage_argv(since: str, until: str, user: str | None, nonce: str) -> list[str]:
    """One sacct read of every allocation that ran in ``[since, until]`` (local times, as sacct takes them:
    ``2026-12-07T18:00:00``): -X allocations only, -D each run of a requeued job, --noconvert raw units.
    ``user`` None: every user's (``--allusers``, for admins); otherwise only that user's."""
    who = "--allusers" if user is None else f"--user={_plain_name('user', user)}"
    return ["sacct", "-n", "-X", "-D", "--noconvert", "--parsable", f"--delimiter={record_mark(nonce)}",
            f"--format={','.join(USAGE_FIELDS)}", f"--starttime={since}", f"--endtime={until}",
            who]  # fmt: skip


def _plain_name(what: str, name: str) -> str:
    """A node or partition name as one ``Key=Value`` word: no spaces, ``=``, commas or brackets."""
    if not name or any(ch in name for ch in " \t\n=,[]\"'"):
        raise ValidationError(f"{what} {name!r} is not a plain Slurm name (fix: e.g. node5, train)")
    return name


def update_partition_argv(partition: str, nodes: Iterable[str]) -> list[str]:
    """``scontrol update PartitionName=P Nodes=node[1-4]``: the partition's whole node list (empty: none)."""
    from hpcserve.hostlists import collect

    names = [_plain_name("node", n) for n in nodes]
    return ["scontrol", "update", f"PartitionName={_plain_name('partition', partition)}",
            f"Nodes={collect(sorted(set(names)))}"]  # fmt: skip


def update_nodes_argv(nodes: Iterable[str], state: str, reason: str | None = None) -> list[str]:
    """``scontrol update NodeName=... State=DRAIN|RESUME [Reason=...]``; the reason is one argv item."""
    from hpcserve.hostlists import collect

    names = sorted({_plain_name("node", n) for n in nodes})
    if not names:
        raise ValidationError("no node given (fix: name one or more nodes, e.g. node5)")
    if state.upper() not in ("DRAIN", "RESUME"):
        raise ValidationError(f"node state {state!r} is not supported (use DRAIN or RESUME)")
    argv = ["scontrol", "update", f"NodeName={collect(names)}", f"State={state.upper()}"]
    if reason is not None:
        if not reason.strip() or "\n" in reason:
            raise ValidationError("a drain reason must be one non-empty line")
        argv.append(f"Reason={reason}")
    return argv


def pin_job_argv(job_id: str, nodes: Iterable[str]) -> list[str]:
    """``scontrol update JobId=12 ReqNodeList=node5``: a pending job may start only on these nodes."""
    from hpcserve.hostlists import collect

    names = sorted({_plain_name("node", n) for n in nodes})
    if not names:
        raise ValidationError("no node given (fix: name one or more nodes, e.g. node5)")
    (checked,) = check_job_ids([job_id])
    return ["scontrol", "update", f"JobId={checked}", f"ReqNodeList={collect(names)}"]


def release_argv(job_ids: Iterable[str]) -> list[str]:
    """``scontrol release 12,13``: held jobs may start (checked ids only)."""
    return ["scontrol", "release", ",".join(check_job_ids(job_ids))]


def requeue_argv(job_ids: Iterable[str]) -> list[str]:
    """``scontrol requeue 12,13``: the jobs go back to pending (checked ids only)."""
    return ["scontrol", "requeue", ",".join(check_job_ids(job_ids))]


def signal_argv(job_ids: Iterable[str], signal: str, *, batch: bool) -> list[str]:
    """scancel --signal to the jobs' steps (``batch=False``, Slurm's default) or only to the batch shell."""
    argv = scancel_argv(job_ids, signal)
    return [*argv[:3], "--batch", *argv[3:]] if batch else argv


def batch_script_argv(job_id: str) -> list[str]:
    """``scontrol write batch_script ID -``: the job's batch script on stdout."""
    return ["scontrol", "write", "batch_script", check_job_ids([job_id])[0], "-"]
