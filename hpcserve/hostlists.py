"""Slurm hostlists (``node[1-4,7]``) through python-hostlist, with hpcserve's error type."""

from __future__ import annotations

from collections.abc import Iterable

import hostlist

from hpcserve.errors import ValidationError


def expand(text: str) -> tuple[str, ...]:
    """``node[1-3]`` -> ("node1", "node2", "node3"); empty, ``(null)`` and ``N/A`` -> ()."""
    text = text.strip()
    if not text or text in ("(null)", "N/A", "None"):
        return ()
    try:
        return tuple(hostlist.expand_hostlist(text))
    except hostlist.BadHostlist as exc:
        raise ValidationError(f"bad hostlist {text!r}: {exc} (write it like node[1-4,7])") from exc


def collect(names: Iterable[str]) -> str:
    """("node1", "node2", "node4") -> ``node[1-2,4]``; no names -> ""."""
    names = list(names)
    return str(hostlist.collect_hostlist(names)) if names else ""
