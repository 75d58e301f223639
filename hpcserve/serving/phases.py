"""How one replica's start went, phase by phase (pure data: no I/O).

The replica measures its start and sends it as ``"phases"`` in its announcement; the service stores it in
``replicas.phases`` and shows it (``hpcserve deployments --verbose``, /metrics). Each phase is a duration
in seconds, one after the other:
- ``queue_wait_s``: Slurm's queue, from the job's submit to its start, filled in by the service at the
  announcement: from the submit the service recorded to ``job_start`` (unix seconds: the replica's process
  start, which it sends), or Slurm's own figure where the two clocks disagree (``hpcserve.api.replicas``);
- ``staging``: the weights to the warm tier: ``kind`` "warm-valid" (the warm copy matched its manifest:
  nothing read), "hashed" (files were hashed, none copied), "copied" (some copied) or "none" (no warm
  tier), its ``seconds``, the bytes copied and the bytes hashed. A pool replica stages each member's
  weights before that member's engine starts: its staging is their sum (``Staging.plus``);
- ``engine_load_s``: the engine's process start until ``/health`` answers 200;
- ``first_healthy_s``: from there until ``/v1/models`` lists the served model;
- ``first_token_s``: from there until one ``max_tokens: 1`` completion has answered.

``StartPhases.from_json`` is also the announcement's check: a bounded object of known keys and finite
numbers, one ``ValidationError`` line naming the field otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from hpcserve.errors import ValidationError

STAGING_KINDS = ("warm-valid", "copied", "hashed", "none")
PHASES = ("queue_wait", "staging", "engine_load", "first_healthy", "first_token")
MAX_SECONDS = 90 * 86400.0  # a queue wait of months is possible on a busy site; more is nonsense
MAX_BYTES = 1 << 60
MAX_UNIX_S = 1e11  # year ~5138: a job start beyond it is no clock reading
_DURATIONS = ("queue_wait_s", "engine_load_s", "first_healthy_s", "first_token_s")
_KEYS = frozenset({*_DURATIONS, "staging", "job_start"})
_STAGING_KEYS = frozenset({"kind", "seconds", "bytes", "hashed_bytes"})
_STAGING_WORK = ("none", "warm-valid", "hashed", "copied")  # the staging kinds, from least work to most


@dataclass(frozen=True, slots=True)
class Staging:
    """The staging phase: what it found and did (``STAGING_KINDS``), how long, and what it moved."""

    kind: str = "none"
    seconds: float = 0.0
    bytes: int = 0  # copied from the cold tier
    hashed_bytes: int = 0  # read to check a sha256 (cold or warm)

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "seconds": round(self.seconds, 3), "bytes": self.bytes,
                "hashed_bytes": self.hashed_bytes}  # fmt: skip

    def plus(self, other: Staging) -> Staging:
        """Two stagings one after the other (a pool replica stages each member's weights): times and
        bytes added, the kind the one that did most (``STAGING_KINDS`` from least: none, warm-valid,
        hashed, copied)."""
        kind = max(self.kind, other.kind, key=_STAGING_WORK.index)
        return Staging(kind, self.seconds + other.seconds, self.bytes + other.bytes,
                       self.hashed_bytes + other.hashed_bytes)  # fmt: skip

    @classmethod
    def from_json(cls, raw: object) -> Staging:
        data = _object(raw, "phases.staging", _STAGING_KEYS)
        kind = data.get("kind")
        if kind not in STAGING_KINDS:
            raise ValidationError(
                f"phases.staging.kind: expected one of {', '.join(STAGING_KINDS)}, got {kind!r}"
            )
        seconds = _number(data.get("seconds", 0.0), "phases.staging.seconds", MAX_SECONDS)
        size = _count(data.get("bytes", 0), "phases.staging.bytes")
        return cls(
            str(kind), seconds, size, _count(data.get("hashed_bytes", 0), "phases.staging.hashed_bytes")
        )


@dataclass(frozen=True, slots=True)
class StartPhases:
    """One replica start's phases (see the module docstring); None: not measured (or not reached)."""

    staging: Staging = Staging()
    engine_load_s: float | None = None
    first_healthy_s: float | None = None
    first_token_s: float | None = None
    queue_wait_s: float | None = None
    job_start: float | None = None  # unix seconds: when the job's process started (for queue_wait_s)

    def as_json(self) -> dict[str, Any]:
        """The JSON object the replica announces and the store keeps (unmeasured phases left out)."""
        out: dict[str, Any] = {"staging": self.staging.as_json()}
        for key in _DURATIONS:
            value = getattr(self, key)
            if value is not None:
                out[key] = round(value, 3)
        if self.job_start is not None:
            out["job_start"] = round(self.job_start, 3)
        return out

    @classmethod
    def from_json(cls, raw: object) -> StartPhases:
        """The phases from their JSON; a one-line ``ValidationError`` naming the field otherwise."""
        data = _object(raw, "phases", _KEYS)
        durations = {key: _optional(data.get(key), f"phases.{key}", MAX_SECONDS) for key in _DURATIONS}
        job_start = _optional(data.get("job_start"), "phases.job_start", MAX_UNIX_S)
        staging = Staging.from_json(data["staging"]) if "staging" in data else Staging()
        return cls(staging=staging, job_start=job_start, **durations)

    def with_staging(self, more: Staging) -> StartPhases:
        """These phases with ``more`` staging added (a pool member's)."""
        return replace(self, staging=self.staging.plus(more))

    def with_queue_wait_s(self, seconds: float) -> StartPhases:
        """The queue wait as Slurm measured it (its submit to its start), unless the replica gave one."""
        if self.queue_wait_s is not None:
            return self
        return replace(self, queue_wait_s=min(MAX_SECONDS, max(0.0, seconds)))

    def with_queue_wait(self, submitted_unix_s: float) -> StartPhases:
        """The queue wait from the submit time the service recorded, unless the replica gave one."""
        if self.queue_wait_s is not None or self.job_start is None:
            return self
        return replace(self, queue_wait_s=min(MAX_SECONDS, max(0.0, self.job_start - submitted_unix_s)))

    def seconds(self) -> dict[str, float]:
        """Each measured phase (``PHASES``) and its seconds, in order."""
        values = {"queue_wait": self.queue_wait_s, "staging": self.staging.seconds,
                  "engine_load": self.engine_load_s, "first_healthy": self.first_healthy_s,
                  "first_token": self.first_token_s}  # fmt: skip
        return {name: value for name, value in values.items() if value is not None}

    def summary(self) -> str:
        """One line for people: ``queue 1.2s, staging copied 3.4s (1.0 GiB), engine load 20.1s, ...``."""
        parts = []
        for name, value in self.seconds().items():
            if name == "staging":
                size = f" ({_size(self.staging.bytes)})" if self.staging.bytes else ""
                parts.append(f"staging {self.staging.kind} {_seconds(value)}{size}")
            else:
                parts.append(f"{_LABELS[name]} {_seconds(value)}")
        return ", ".join(parts)


def _seconds(value: float) -> str:
    """Milliseconds shown below a second (a warm copy checked in 2 ms is not "0.0s")."""
    return f"{value:.3f}s" if value < 1 else f"{value:.1f}s"


_LABELS = {"queue_wait": "queue", "staging": "staging", "engine_load": "engine load",
           "first_healthy": "healthy", "first_token": "first token"}  # fmt: skip


def _size(n: int) -> str:
    """Bytes for people: ``512 B``, ``3.2 MiB``, ``14.9 GiB``."""
    if n < 1024:
        return f"{n} B"
    exponent = min(3, int(math.log(n, 1024)))
    return f"{n / 1024**exponent:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"


def _object(raw: object, field: str, keys: frozenset[str]) -> Mapping[str, Any]:
    if not isinstance(raw, dict):
        raise ValidationError(f"{field}: expected a JSON object, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in keys)
    if unknown:
        raise ValidationError(f"{field}: unknown key {unknown[0]!r} (fix: use {', '.join(sorted(keys))})")
    return raw


def _number(value: object, field: str, bound: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValidationError(f"{field}: expected a number of seconds, got {value!r}")
    if not 0 <= value <= bound:
        raise ValidationError(f"{field}: expected 0 to {bound:g}, got {value!r}")
    return float(value)


def _optional(value: object, field: str, bound: float) -> float | None:
    return None if value is None else _number(value, field, bound)


def _count(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_BYTES:
        raise ValidationError(f"{field}: expected a byte count (0 to 2**60), got {value!r}")
    return value
