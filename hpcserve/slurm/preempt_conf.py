"""What the live Slurm says about preemption: ``scontrol show config``, ``scontrol show partition -o`` and
``sacctmgr show qos``, as argv lists and pure parsers (tested on recorded output in tests/data/)."""

from __future__ import annotations

from dataclasses import dataclass

from hpcserve.hostlists import expand
from hpcserve.slurm.parsers import parse_kv_line
from hpcserve.slurm.timefmt import parse_duration

SHOW_CONFIG_ARGV = ("scontrol", "show", "config")
SHOW_PARTITIONS_ARGV = ("scontrol", "show", "partition", "-o")
QOS_FIELDS = ("Name", "Preempt", "PreemptMode", "GraceTime")
SHOW_QOS_ARGV = ("sacctmgr", "-n", "-P", "show", "qos", f"format={','.join(QOS_FIELDS)}")


@dataclass(frozen=True, slots=True)
class PartitionPreempt:
    """One partition as preemption sees it."""

    name: str
    nodes: tuple[str, ...]
    priority_tier: int
    preempt_mode: str  # as scontrol prints it: REQUEUE, OFF, CANCEL, GANG,SUSPEND, ...
    grace_time_s: int
    qos: str  # the partition QOS, "N/A" when none


@dataclass(frozen=True, slots=True)
class QosPreempt:
    """One QOS as preemption sees it."""

    name: str
    preempt: tuple[str, ...]  # the QOS it may preempt
    preempt_mode: str  # "cluster": the cluster's PreemptMode
    grace_time_s: int


@dataclass(frozen=True, slots=True)
class LiveSlurm:
    """Everything the lending check compares: the cluster's settings, its partitions and (if read) its QOS."""

    preempt_type: str
    preempt_mode: str
    partitions: dict[str, PartitionPreempt]
    qos: dict[str, QosPreempt] | None = None


def parse_show_config(text: str) -> dict[str, str]:
    """``scontrol show config`` -> {key: value}; the first value of a key wins."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(" = ")
        if sep and key.strip() and key.strip() not in out:
            out[key.strip()] = value.strip()
    return out


def parse_partition_preempt(text: str) -> dict[str, PartitionPreempt]:
    """``scontrol show partition -o`` -> name: its preemption settings."""
    parts = (parse_kv_line(line) for line in text.splitlines() if line.startswith("PartitionName="))
    return {kv["PartitionName"]: _partition(kv) for kv in parts}


def _partition(kv: dict[str, str]) -> PartitionPreempt:
    nodes = kv.get("Nodes", "")
    return PartitionPreempt(
        name=kv["PartitionName"],
        nodes=tuple(expand(nodes)) if nodes and nodes != "(null)" else (),
        priority_tier=int(kv.get("PriorityTier") or 1),
        preempt_mode=kv.get("PreemptMode", ""),
        grace_time_s=int(kv.get("GraceTime") or 0),
        qos=kv.get("QoS", "N/A"),
    )


def parse_qos(text: str) -> dict[str, QosPreempt]:
    """``sacctmgr -n -P show qos format=Name,Preempt,PreemptMode,GraceTime`` -> name: its settings."""
    out: dict[str, QosPreempt] = {}
    for line in text.splitlines():
        cols = line.split("|")
        if len(cols) != len(QOS_FIELDS) or not cols[0]:
            continue
        name, preempt, mode, grace = cols
        out[name] = QosPreempt(name, tuple(p for p in preempt.split(",") if p), mode, _seconds(grace))
    return out


def _seconds(text: str) -> int:
    try:
        return parse_duration(text) or 0
    except ValueError:
        return 0


def live_slurm(config: str, partitions: str, qos: str | None = None) -> LiveSlurm:
    """The three recorded outputs (``qos`` None: not read) -> one ``LiveSlurm``."""
    settings = parse_show_config(config)
    return LiveSlurm(
        preempt_type=settings.get("PreemptType", ""),
        preempt_mode=settings.get("PreemptMode", ""),
        partitions=parse_partition_preempt(partitions),
        qos=None if qos is None else parse_qos(qos),
    )
