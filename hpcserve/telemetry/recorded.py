"""Recordings of NVML devices: written from a real GPU by ``hpcserve telemetry record``, replayed by the
recorded NVML library of the tests (``tests/nvml_recorded/recorded_nvml.c``), so the sampler's real code path
runs on machines without a GPU.

The format is plain text, one record a line (the C replayer reads it with sscanf):

    # hpcserve-nvml-recording 1
    # source: real GPU ...            (or: synthetic ..., for hand-written files: say which)
    driver 550.54.15
    device GPU-8f3c...  85520809984  NVIDIA H100 80GB HBM3      (UUID, memory total in bytes, name)
    mig MIG-1a2b...  10468982784  NVIDIA H100 80GB HBM3 MIG 1g.10gb     (a MIG slice: by UUID only)
    sample 0.0 GPU-8f3c... 37 21474836480 250123 1410   (seconds, UUID, util %, memory used B, power mW,
                                                         SM clock MHz; "-" where NVML did not report it)

A device's NVML index is its place among the ``device`` lines. Everything but ``record`` is pure.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from hpcserve.errors import ValidationError

if TYPE_CHECKING:
    from hpcserve.telemetry.nvml import NvmlSampler

MAGIC = "# hpcserve-nvml-recording 1"


@dataclass(frozen=True, slots=True)
class RecordedDevice:
    uuid: str
    mem_total_bytes: int
    name: str
    mig: bool = False


@dataclass(frozen=True, slots=True)
class RecordedRow:
    t_s: float
    uuid: str
    util_pct: int | None
    mem_used_bytes: int | None
    power_mw: int | None
    sm_clock_mhz: int | None


@dataclass(frozen=True, slots=True)
class Recording:
    source: str  # "real GPU ..." or "synthetic ...": where the numbers come from, in words
    driver: str
    devices: tuple[RecordedDevice, ...]
    rows: tuple[RecordedRow, ...]

    def series(self, uuid: str) -> list[RecordedRow]:
        return [row for row in self.rows if row.uuid == uuid]


def render(recording: Recording) -> str:
    """The recording as text (``parse`` reads it back)."""
    lines = [MAGIC, f"# source: {_one_line(recording.source)}", f"driver {_word(recording.driver)}"]
    for d in recording.devices:
        lines.append(
            f"{'mig' if d.mig else 'device'} {_word(d.uuid)} {d.mem_total_bytes} {_one_line(d.name)}"
        )
    for r in recording.rows:
        fields = (r.util_pct, r.mem_used_bytes, r.power_mw, r.sm_clock_mhz)
        lines.append(f"sample {r.t_s:.3f} {r.uuid} " + " ".join("-" if f is None else str(f) for f in fields))
    return "\n".join(lines) + "\n"


def parse(text: str, where: str = "recording") -> Recording:
    """A recording's text; ``ValidationError`` naming the line that is wrong."""
    source, driver = "", ""
    devices: list[RecordedDevice] = []
    rows: list[RecordedRow] = []
    for number, line in enumerate(text.splitlines(), 1):
        kind, _, rest = line.strip().partition(" ")
        try:
            if kind == "#" and rest.startswith("source:"):
                source = rest.removeprefix("source:").strip()
            elif kind == "driver":
                driver = rest.strip()
            elif kind in ("device", "mig"):
                devices.append(_device(kind, rest))
            elif kind == "sample":
                rows.append(_row(rest, {d.uuid for d in devices}))
            elif kind and not kind.startswith("#"):
                raise ValueError(f"unknown record {kind!r}")
        except (ValueError, IndexError) as exc:
            raise ValidationError(
                f"{where}: line {number}: {exc} (fix: see the format in hpcserve/telemetry/recorded.py)"
            ) from None
    return Recording(source, driver, tuple(devices), tuple(rows))


def _device(kind: str, rest: str) -> RecordedDevice:
    uuid, total, *name = rest.split(maxsplit=2)
    return RecordedDevice(uuid, int(total), name[0] if name else "", mig=kind == "mig")


def _row(rest: str, uuids: set[str]) -> RecordedRow:
    t, uuid, *fields = rest.split()
    if uuid not in uuids:
        raise ValueError(f"sample of {uuid!r} before its device line")
    if len(fields) != 4:
        raise ValueError(f"a sample has 6 fields, this one {len(fields) + 2}")
    util, used, power, clock = (None if f == "-" else int(f) for f in fields)
    return RecordedRow(float(t), uuid, util, used, power, clock)


def _word(text: str) -> str:
    if not text or any(c.isspace() for c in text):
        raise ValidationError(f"recording: {text!r} must be one word (no spaces)")
    return text


def _one_line(text: str) -> str:
    return " ".join(text.split())


def record(
    sampler: NvmlSampler,
    seconds: float,
    interval_s: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> Recording:
    """Sample ``sampler`` (opened) every ``interval_s`` for ``seconds`` (``seconds / interval_s`` samples per
    device, the first at once); the devices as NVML names them."""
    devices = tuple(RecordedDevice(d.uuid, 0, d.name) for d in sampler.devices)
    rows: list[RecordedRow] = []
    totals: dict[str, int] = {}
    start = monotonic()
    for k in range(max(1, round(seconds / interval_s))):
        sleep(max(0.0, start + k * interval_s - monotonic()))
        t = round(monotonic() - start, 3)
        for s in sampler.sample():
            totals[s.gpu_uuid] = s.mem_total_bytes
            power_mw = None if s.power_w is None else round(s.power_w * 1000)
            rows.append(
                RecordedRow(t, s.gpu_uuid, round(s.util_pct), s.mem_used_bytes, power_mw, s.sm_clock_mhz)
            )
    return Recording(_source(sampler, seconds, interval_s), sampler.driver or "unknown",
                     _with_totals(devices, totals), tuple(rows))  # fmt: skip


def _with_totals(devices: Sequence[RecordedDevice], totals: dict[str, int]) -> tuple[RecordedDevice, ...]:
    return tuple(
        RecordedDevice(d.uuid, totals.get(d.uuid, 0), d.name, d.uuid.startswith("MIG-")) for d in devices
    )


def _source(sampler: NvmlSampler, seconds: float, interval_s: float) -> str:
    names = ", ".join(sorted({d.name for d in sampler.devices})) or "no device"
    when = datetime.now(UTC).isoformat(timespec="seconds")
    driver = sampler.driver or "unknown"
    return (f"real GPU ({names}), recorded by `hpcserve telemetry record` on {socket.gethostname()} at "
            f"{when}, {seconds:g} s every {interval_s:g} s, NVML driver {driver}")  # fmt: skip
