"""The ``#SBATCH`` lines of a script, read the way sbatch reads them, as defaults for a ``JobRequest``.

hpcserve passes its options on sbatch's command line, which overrides the script's ``#SBATCH`` lines; so
what a user leaves out must come from the script, not from hpcserve's own defaults.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

_SHORT = {
    "-N": "nodes",
    "-p": "partition",
    "-t": "time",
    "-J": "job-name",
    "-a": "array",
    "-c": "cpus-per-task",
}
_GRES_GPU = re.compile(r"(?:^|,)gpu(?::[\w.-]+)?:(\d+)(?:,|$)")


@dataclass(frozen=True, slots=True)
class SbatchDefaults:
    """What a script's header asks for; ``None`` where it says nothing."""

    nodes: int | None = None
    tasks_per_node: int | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    time: str | None = None
    partition: str | None = None
    array: str | None = None
    job_name: str | None = None


def sbatch_options(script: str) -> dict[str, str]:
    """``#SBATCH`` options up to the first command -> {long name: value}; a later line wins, like sbatch."""
    options: dict[str, str] = {}
    for line in script.splitlines()[1:]:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break  # sbatch stops reading directives at the first command
        if stripped.startswith("#SBATCH"):
            options.update(_parse_directive(stripped.removeprefix("#SBATCH")))
    return options


def _parse_directive(text: str) -> dict[str, str]:
    words = shlex.split(text.split(" #", 1)[0])
    parsed: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            if not eq and i + 1 < len(words) and not words[i + 1].startswith("-"):
                value, i = words[i + 1], i + 1
            parsed[name] = value
        elif word[:2] in _SHORT:
            value = word[2:] or (words[i + 1] if i + 1 < len(words) else "")
            i += 0 if word[2:] else 1
            parsed[_SHORT[word[:2]]] = value.lstrip("=")
        i += 1
    return parsed


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def sbatch_defaults(script: str) -> SbatchDefaults:
    opts = sbatch_options(script)
    gpus = _int(opts.get("gpus-per-node"))
    if gpus is None and (match := _GRES_GPU.search(opts.get("gres", ""))):
        gpus = int(match[1])
    return SbatchDefaults(
        nodes=_int(opts.get("nodes", "").split("-")[0] or None),
        tasks_per_node=_int(opts.get("ntasks-per-node")),
        gpus_per_node=gpus,
        cpus_per_task=_int(opts.get("cpus-per-task")),
        time=opts.get("time"),
        partition=opts.get("partition"),
        array=opts.get("array"),
        job_name=opts.get("job-name"),
    )
