"""The verdict of ``nccl-probe.sbatch``: per-node bandwidth, which nodes are degraded, and where that is kept.

The probe prints one line per node (``node=node3 ranks=2 p2p_min=0.812GB/s busbw_mean=1.204GB/s``). A node
whose ring bandwidth falls below ``fraction`` of the median of its peers is degraded; placement leaves it
out until a newer probe clears it or the verdict ages out.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from hpcserve.errors import ValidationError

DEFAULT_PATH = Path("~/.local/state/hpcserve/probe.json")
MAX_AGE_S = 7 * 86400
_LINE = re.compile(r"^node=(\S+) ranks=\S+ p2p_min=([\d.]+)GB/s busbw_mean=([\d.]+)GB/s", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class NodeBandwidth:
    node: str
    p2p_gbps: float
    busbw_gbps: float


@dataclass(frozen=True, slots=True)
class ProbeVerdict:
    at: str  # ISO 8601, UTC
    nodes: tuple[NodeBandwidth, ...]
    degraded: tuple[str, ...]


def parse_probe_output(text: str) -> list[NodeBandwidth]:
    """The per-node summary lines of a probe's output; none at all is an error."""
    found = [NodeBandwidth(m[1], float(m[2]), float(m[3])) for m in _LINE.finditer(text)]
    if not found:
        raise ValidationError(
            "no per-node lines (node=... p2p_min=...) in the probe output "
            "(fix: give the output file of a finished nccl-probe job)"
        )
    return found


def find_degraded(nodes: Iterable[NodeBandwidth], fraction: float = 0.5) -> tuple[str, ...]:
    """Nodes whose ring bandwidth is below ``fraction`` of the median node's."""
    nodes = list(nodes)
    if len(nodes) < 2:
        return ()
    median = statistics.median(n.p2p_gbps for n in nodes)
    return tuple(sorted(n.node for n in nodes if n.p2p_gbps < fraction * median))


def verdict(text: str, now: datetime, fraction: float = 0.5) -> ProbeVerdict:
    nodes = parse_probe_output(text)
    return ProbeVerdict(now.astimezone(UTC).isoformat(), tuple(nodes), find_degraded(nodes, fraction))


def save(path: Path, new: ProbeVerdict) -> None:
    """Write the verdict atomically (readers never see half a file)."""
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(new), indent=1) + "\n")
    tmp.replace(path)


def load_degraded(path: Path, now: datetime, max_age_s: float = MAX_AGE_S) -> frozenset[str]:
    """Degraded nodes of the last probe, unless it is older than ``max_age_s``; none without a probe."""
    path = path.expanduser()
    if not path.exists():
        return frozenset()
    data = json.loads(path.read_text())
    age = (now - datetime.fromisoformat(data["at"])).total_seconds()
    return frozenset(data["degraded"]) if age <= max_age_s else frozenset()
