"""Pure parsers for Slurm 22.05's output, tested on output recorded from the real cluster (tests/data/).

Which output, and why:
- jobs: ``squeue -O`` (through SQUEUE_FORMAT2, see commands.squeue_env). Unlike ``squeue --json`` it
  honours -j/-t/-u/-p and takes ~0.1 s instead of ~2 s at 10k jobs. ``tres-alloc`` gives the job's total
  GPUs both when pending (requested) and running (allocated), and its GPU shards (``gres/shard=N``).
- nodes: ``sinfo --json``. One record per node with state flags as a list (no ``idle*`` / ``drng``
  decoding); its size grows with nodes, not jobs, so the 22.05 "ignores filters" caveat costs nothing.
- partitions and topology: ``scontrol show ... -o`` key=value lines (scontrol has no --json in 22.05).
- accounting: ``sacct --parsable`` with a per-call mark as the delimiter.

What Slurm 22.05.8 keeps of a user's text (checked on the local cluster, submitted as another user with
``sbatch --job-name=$'a\x1fb\tc\nd' --comment=$'x\x1fhpcserve:replica:foo:0\ny'``, then every byte 0x01-0xff):
every byte, verbatim, in --job-name and --comment alike: 0x1f, tab, newline, carriage return, 0x1c-0x1e and
bytes that are not UTF-8 (0xff). squeue -O, ``sacct --parsable2`` and ``scontrol show job`` (-o too) print
them raw, unescaped; only the JSON outputs escape them. (The comment is not in sacct here: slurmdbd keeps it
only with AccountingStoreFlags=job_comment.) So, in text output, a user's name or comment can hold our field
separator and whole forged lines. Therefore:
- the two free-text fields come last, after Slurm's own fields (split with maxsplit, so a SEP in the name
  stays in the name), and each ends with a mark: SEP plus a random nonce that squeue gets through its
  environment (unreadable to other users) and no user can guess. A record ends only at the mark and a
  newline; a newline in a name continues the record, never starts a job. The comment (the only source of
  hpcserve's tag) is what lies between the first mark and the end mark;
- a record that still does not parse is dropped and logged, never fatal to the other jobs;
- the runner decodes with errors="replace" (a 0xff in a name used to stop `hpcserve ps` for everyone);
- command output is split on "\n" only (``str.splitlines`` also splits on 0x1c-0x1e, 0x0b, 0x0c, 0x85).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from datetime import datetime
from functools import lru_cache, partial
from typing import Protocol

from hpcserve.errors import SlurmParseError
from hpcserve.hostlists import expand
from hpcserve.model.usage import GpuAllocation
from hpcserve.slurm.commands import (
    NONCE,
    SACCT_FIELDS,
    SEP,
    SQUEUE_FIELDS,
    SQUEUE_FREE_TEXT,
    USAGE_FIELDS,
    record_mark,
)
from hpcserve.slurm.models import (
    AccountingRecord,
    Job,
    JobState,
    Node,
    Partition,
    Switch,
    Topology,
    tag_of,
    wait_of,
)  # fmt: skip
from hpcserve.slurm.timefmt import parse_duration, parse_timestamp


class WaitFn(Protocol):
    def __call__(self, state: JobState, submit: datetime | None, start: datetime | None) -> float | None: ...


_NULL = frozenset({"", "(null)", "N/A", "None"})
_FIXED = len(SQUEUE_FIELDS) - SQUEUE_FREE_TEXT  # Slurm's own fields, then the name and the comment
# A queue repeats the same few strings (submit second, time limit, TRES request) thousands of times:
# parse each distinct one once. Bounded, so a long-running service does not grow.
_timestamp = lru_cache(maxsize=8192)(parse_timestamp)
_expand = lru_cache(maxsize=8192)(expand)
_state = lru_cache(maxsize=256)(JobState.parse)


def _clean(value: str) -> str:
    value = value.strip()
    return "" if value in _NULL else value


@lru_cache(maxsize=4096)
def gpus_from_tres(tres: str) -> int:
    """``cpu=2,mem=2G,node=2,billing=2,gres/gpu=4`` -> 4 (typed entries like gres/gpu:h100=4 ignored)."""
    for item in tres.split(","):
        key, _, value = item.partition("=")
        if key == "gres/gpu" and value.isdigit():
            return int(value)
    return 0


@lru_cache(maxsize=1024)
def _duration(text: str) -> int | None:
    try:
        return parse_duration(text)
    except ValueError:
        return None


def parse_squeue(text: str, now: datetime, nonce: str = NONCE) -> list[Job]:
    """Parse the output of ``squeue -h -r`` with ``squeue_env(nonce)``, observed at ``now``."""
    return list(iter_squeue(text_lines(text), now, nonce))


def text_lines(text: str) -> list[str]:
    """Lines with their newline, split on newlines only (``str.splitlines`` also splits on 0x1c-0x1e,
    form feeds and U+2028, all of which a job name may hold), as a command's stdout yields them."""
    lines = [line + "\n" for line in text.split("\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def iter_squeue(lines: Iterable[str], now: datetime, nonce: str = NONCE) -> Iterator[Job]:
    """Parse squeue's lines one by one, e.g. while squeue is still printing them. A record ends at the mark
    and a newline; a newline inside a job name or comment only continues the record."""
    # Jobs submitted in the same second wait equally long: compute each distinct wait once per call.
    wait = lru_cache(maxsize=8192)(partial(wait_of, now=now))
    mark = record_mark(nonce)
    end = mark + "\n"
    pending: list[str] = []
    for line in lines:  # one loop, no helper per record: this runs 10,000 times per `hpcserve ps`
        if not line.endswith(end):
            pending.append(line)
            continue
        if pending:
            line = "".join([*pending, line])
            pending.clear()
        parts = line.split(mark)  # exactly two marks: after the name and after the comment
        if len(parts) == 2:  # the name's mark, then a comment that starts with a newline: not the end
            pending.append(line)
            continue
        if len(parts) == 3:
            c = parts[0].split(SEP, _FIXED)
            if len(c) == _FIXED + 1 and c[0].isdigit():
                yield _job(c, parts[1], wait)
                continue
        _log_dropped("squeue", line)
    _check_ended("squeue", pending)


def _records(lines: Iterable[str], end: str, what: str) -> Iterator[str]:
    """Whole records without their end: lines are joined until one ends with ``end``."""
    cut = -len(end)
    pending: list[str] = []
    for line in lines:
        if not line.endswith(end):
            pending.append(line)
        elif pending:
            yield "".join([*pending, line])[:cut]
            pending.clear()
        else:
            yield line[:cut]
    _check_ended(what, pending)


def _check_ended(what: str, pending: list[str]) -> None:
    """Output that ends inside a record was not printed with our mark (a format squeue did not get)."""
    if "".join(pending).strip():
        raise SlurmParseError(f"{what}: the output ends inside a record (no end mark): {pending[0][:120]!r}")


def _log_dropped(what: str, record: str) -> None:
    import logging

    logging.getLogger("hpcserve.slurm").warning(
        "%s: dropped a record that does not parse: %r", what, record[:200]
    )


def _job(c: list[str], comment: str, wait: WaitFn) -> Job:
    null = _NULL  # -O prints fields unpadded: only Slurm's "no value" words need cleaning
    state, submit, start = _state(c[6]), _timestamp(c[10]), _timestamp(c[11])
    comment = "" if comment in null else comment
    # Positional, in Job's field order: keyword arguments cost 7x more, at 10,000 jobs per call.
    return Job(
        c[1] or c[0], int(c[0]), c[14], c[2],                   # id, job_id, name, user
        "" if c[3] in null else c[3], c[4], state,              # account, partition, state
        int(c[7]) if c[7].isdigit() else 0,                     # num_nodes
        _expand(c[8]) if c[8] else (), gpus_from_tres(c[9]),    # nodes, gpus
        "" if c[5] in null else c[5], submit, start,            # qos, submit, start
        _duration(c[12]), "" if c[13] in null else c[13],       # time_limit_s, reason
        comment, tag_of(comment),                               # comment, tag
        wait(state, submit, start), None, None,                 # wait_s, gpu_util_pct, idle
        tres_count(c[9], "gres/shard"),                         # shards
    )  # fmt: skip


def split_outside_parens(text: str, sep: str = ",") -> Iterator[str]:
    """``gpu:h100:2(IDX:0-1,3),nic:1`` -> ``gpu:h100:2(IDX:0-1,3)``, ``nic:1``."""
    depth, start = 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if ch == sep and depth == 0:
            yield text[start:i]
            start = i + 1
    if text[start:]:
        yield text[start:]


def parse_gpu_gres(gres: str | None) -> tuple[int, str | None]:
    """``gpu:h100:4(S:0-1)`` -> (4, "h100"); ``gpu:2`` -> (2, None); summed over several gpu entries."""
    total, gpu_type = 0, None
    for item in split_outside_parens(gres or ""):
        parts = item.split("(", 1)[0].split(":")
        if parts[0] != "gpu" or len(parts) < 2 or not parts[-1].isdigit():
            continue
        total += int(parts[-1])
        if len(parts) == 3:
            gpu_type = parts[1]
    return total, gpu_type


def parse_shard_gres(gres: str | None) -> int:
    """Shards a node's ``gres`` holds: ``gpu:l40s:4,shard:l40s:16`` -> 16; ``shard:8`` -> 8; none -> 0."""
    total = 0
    for item in split_outside_parens(gres or ""):
        parts = item.split("(", 1)[0].split(":")
        if parts[0] == "shard" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def gres_used_indices(gres_used: str | None, name: str) -> tuple[int, ...]:
    """The device indices of ``name`` in use, from a node's ``gres_used`` (``GresUsed``):
    ``gpu:l40s:1(IDX:2),shard:l40s:2(IDX:0-1)`` -> (2,) for gpu, (0, 1) for shard; ``(IDX:N/A)`` -> ().
    Slurm 22.05 counts GPUs there, not shards: the shards in use come from tres_used (``gres/shard=N``)."""
    found: set[int] = set()
    for item in split_outside_parens(gres_used or ""):
        head, _, rest = item.partition("(")
        if head.split(":", 1)[0] == name and rest.startswith("IDX:"):
            found.update(_indices(rest.removeprefix("IDX:").rstrip(")")))
    return tuple(sorted(found))


def _indices(text: str) -> Iterator[int]:
    """``0-1,3`` -> 0, 1, 3 (``N/A`` and anything else that is no index list -> nothing)."""
    for part in text.split(","):
        low, _, high = part.partition("-")
        if low.isdigit() and (high or low).isdigit():
            yield from range(int(low), int(high or low) + 1)


def tres_count(tres: str, key: str) -> int:
    """``cpu=7,mem=7G,gres/gpu=1,gres/shard=7`` with key ``gres/shard`` -> 7 (absent -> 0)."""
    for item in tres.split(","):
        name, _, value = item.partition("=")
        if name == key and value.isdigit():
            return int(value)
    return 0


def parse_sinfo_json(text: str) -> list[Node]:
    """Parse ``sinfo --json`` (OpenAPI v0.0.38 in Slurm 22.05)."""
    try:
        data = json.loads(text)
        records = data["nodes"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SlurmParseError(f"sinfo --json: unexpected output ({exc})") from exc
    return [_node_from_json(r) for r in records]


def _node_from_json(r: dict[str, object]) -> Node:
    gpus_total, gpu_type = parse_gpu_gres(str(r.get("gres") or ""))
    features = str(r.get("active_features") or r.get("features") or "")
    flags = r.get("state_flags") or []
    return Node(
        name=str(r["name"]),
        state=str(r.get("state", "unknown")).lower(),
        flags=frozenset(str(f).upper() for f in flags) if isinstance(flags, list) else frozenset(),
        partitions=tuple(str(p) for p in r.get("partitions") or ()),  # type: ignore[attr-defined]
        gpus_total=gpus_total,
        gpus_alloc=gpus_from_tres(str(r.get("tres_used") or "")),
        gpu_type=gpu_type,
        features=tuple(f for f in features.split(",") if f),
        cpus_total=_int(r.get("cpus")),
        cpus_alloc=_int(r.get("alloc_cpus")),
        memory_mb=_int(r.get("real_memory")),
        memory_alloc_mb=_int(r.get("alloc_memory")),
        address=str(r.get("address") or ""),
        reason=str(r.get("reason") or ""),
        shards_total=parse_shard_gres(str(r.get("gres") or "")),
        shards_alloc=tres_count(str(r.get("tres_used") or ""), "gres/shard"),
        shard_gpus=gres_used_indices(str(r.get("gres_used") or ""), "shard"),
        whole_gpus=gres_used_indices(str(r.get("gres_used") or ""), "gpu"),
    )


def _int(value: object) -> int:
    return value if isinstance(value, int) else int(str(value)) if str(value).isdigit() else 0


_KV = re.compile(r"(?:^|\s)([A-Za-z][\w/:.]*)=")


def parse_kv_line(line: str) -> dict[str, str]:
    """One ``scontrol show ... -o`` line -> {key: value}. Values may contain spaces (``OS=Linux 6.1 #1``):
    a value runs until the next `` Key=``."""
    matches = list(_KV.finditer(line))
    out: dict[str, str] = {}
    for m, nxt in zip(matches, [*matches[1:], None], strict=True):
        end = nxt.start() if nxt else len(line)
        out[m.group(1)] = line[m.end() : end].strip()
    return out


def parse_partitions(text: str) -> list[Partition]:
    """Parse ``scontrol show partition -o``."""
    return [
        _partition(parse_kv_line(line)) for line in text.splitlines() if line.startswith("PartitionName=")
    ]


def _partition(kv: dict[str, str]) -> Partition:
    return Partition(
        name=kv["PartitionName"],
        nodes=expand(kv.get("Nodes", "")),
        state=kv.get("State", "UP"),
        default=kv.get("Default") == "YES",
        max_time_s=_duration(kv.get("MaxTime", "UNLIMITED")),
        default_time_s=_duration(kv["DefaultTime"]) if _clean(kv.get("DefaultTime", "")) else None,
        priority_tier=int(kv.get("PriorityTier", "1") or 1),
        preempt_mode=kv.get("PreemptMode", ""),
        total_gpus=gpus_from_tres(kv.get("TRES", "")),
    )


def parse_topology(text: str) -> Topology:
    """Parse ``scontrol show topology`` (topology/tree)."""
    switches = []
    for line in text.splitlines():
        if not line.startswith("SwitchName="):
            continue
        kv = parse_kv_line(line)
        switches.append(
            Switch(
                name=kv["SwitchName"],
                level=int(kv.get("Level", "0") or 0),
                nodes=expand(kv.get("Nodes", "")),
                switches=expand(kv.get("Switches", "")),
            )
        )
    return Topology(tuple(switches))


def parse_sacct(text: str, nonce: str) -> list[AccountingRecord]:
    """Parse ``sacct -n -X --parsable --delimiter=record_mark(nonce) -o <SACCT_FIELDS>``: every field,
    the last one too, ends with the mark; a record that does not parse is dropped (and logged)."""
    mark = record_mark(nonce)
    records = []
    for record in _records(text_lines(text), mark + "\n", "sacct"):
        c = record.split(mark)
        if len(c) != len(SACCT_FIELDS) or not c[0].isdigit():
            _log_dropped("sacct", record)
            continue
        records.append(_accounting(c))
    return records


def _accounting(c: list[str]) -> AccountingRecord:
    return AccountingRecord(
        job_id=c[0],
        name=c[1],
        user=c[2],
        account=c[3],
        partition=c[4],
        state=JobState.parse(c[5]),
        exit_code=c[6],
        nodes=expand(c[7]) if c[7] != "None assigned" else (),
        gpus=gpus_from_tres(c[8]),
        submit=parse_timestamp(c[9]),
        start=parse_timestamp(c[10]),
        end=parse_timestamp(c[11]),
        elapsed_s=int(c[12]) if c[12].isdigit() else 0,
    )


def gpu_tres(tres: str) -> tuple[int, tuple[tuple[str, int], ...]]:
    """AllocTRES -> (``gres/gpu=N``, the typed ``gres/gpu:TYPE=N`` entries): ``billing=4,gres/gpu=4,
    gres/gpu:a100=3,gres/gpu:l40s=1`` -> (4, (("a100", 3), ("l40s", 1)))."""
    typed = []
    for item in tres.split(","):
        key, _, value = item.partition("=")
        if key.startswith("gres/gpu:") and value.isdigit():
            typed.append((key.removeprefix("gres/gpu:"), int(value)))
    return gpus_from_tres(tres), tuple(typed)


def parse_sacct_usage(text: str, nonce: str) -> list[GpuAllocation]:
    """Parse ``sacct_usage_argv``'s output (every field ends with the mark; the job name and the comment,
    which a user writes, come last). A record that does not parse is dropped (and logged)."""
    mark = record_mark(nonce)
    out = []
    for record in _records(text_lines(text), mark + "\n", "sacct"):
        c = record.split(mark)
        if len(c) != len(USAGE_FIELDS) or not c[0].isdigit():
            _log_dropped("sacct", record)
            continue
        out.append(_allocation(c))
    return out


def _allocation(c: list[str]) -> GpuAllocation:
    gpus, typed = gpu_tres(c[6])
    return GpuAllocation(
        job_id=c[0], user=c[1], account=_clean(c[2]), partition=_clean(c[3]), state=c[4].split(" ", 1)[0],
        nodes=expand(c[5]) if _clean(c[5]) and c[5] != "None assigned" else (), gpus=gpus, gpu_types=typed,
        start=parse_timestamp(c[7]), end=parse_timestamp(c[8]),
        elapsed_s=int(c[9]) if c[9].isdigit() else 0, name=c[10], comment=c[11],
    )  # fmt: skip


def parse_sbatch(text: str) -> str:
    """``sbatch --parsable`` prints ``<jobid>`` or ``<jobid>;<cluster>``."""
    job_id = text.strip().split(";", 1)[0]
    if not job_id.isdigit():
        raise SlurmParseError(f"sbatch: no job id in output {text.strip()[:120]!r}")
    return job_id
