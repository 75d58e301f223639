"""Slurm's time and duration formats, parsed purely."""

from __future__ import annotations

from datetime import UTC, datetime

UNLIMITED_WORDS = frozenset({"UNLIMITED", "INFINITE", "INFINITY"})
_UNSET = frozenset({"", "N/A", "NONE", "UNKNOWN", "(NULL)", "INVALID"})


def parse_duration(text: str) -> int | None:
    """Slurm duration -> seconds; ``UNLIMITED`` -> None.

    Accepts ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM`` and ``D-HH:MM:SS`` (sbatch --time).
    Raises ValueError on anything else.
    """
    text = text.strip()
    if text.upper() in UNLIMITED_WORDS:
        return None
    days, _, rest = text.rpartition("-")
    if not rest or not rest.replace(":", "").isdigit() or (days and not days.isdigit()):
        raise ValueError(f"not a Slurm duration: {text!r} (use D-HH:MM:SS, HH:MM:SS or MM)")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) > 3:
        raise ValueError(f"not a Slurm duration: {text!r} (use D-HH:MM:SS, HH:MM:SS or MM)")
    if days:
        h, m, s = [*parts, 0, 0][:3]
        return int(days) * 86400 + h * 3600 + m * 60 + s
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def parse_timestamp(text: str) -> datetime | None:
    """``2026-11-22T21:53:31`` (slurmctld's local time) -> aware UTC datetime; N/A, Unknown -> None."""
    text = text.strip()
    if text.upper() in _UNSET:
        return None
    try:
        return datetime.fromisoformat(text).astimezone(UTC)
    except ValueError:
        return None


def parse_epoch(value: int | float | None) -> datetime | None:
    """Seconds since the epoch (Slurm's JSON and pyslurm) -> aware UTC datetime; 0 or None -> None."""
    if not value:
        return None
    return datetime.fromtimestamp(value, UTC)
