"""Pieces shared by the config models: the frozen base, hostlist fields and the error that carries a fix."""

from __future__ import annotations

from collections import Counter
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

from hpcserve import hostlists
from hpcserve.errors import ValidationError


class Invalid(ValueError):
    """A rule that a config value breaks, raised inside a validator.

    ``field`` is dotted and relative to where the validator runs ("" for that place itself); the loader
    turns it, with the problem and the fix, into one ``ConfigError`` line.
    """

    def __init__(self, field: str, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.field, self.problem, self.fix = field, problem, fix


class Frozen(BaseModel):
    """Base of every config model: immutable, and unknown fields are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def nodes_text(names: list[str] | tuple[str, ...]) -> str:
    """Node names for a message, compacted: ("node5", "node6") -> "node[5-6]"."""
    return hostlists.collect(names)


def _expand_hostlist(value: object) -> tuple[str, ...]:
    """A hostlist string (``node[1-4,7]``) or a list of them -> node names, each once."""
    if isinstance(value, str):
        parts = [value]
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        parts = list(value)
    else:
        raise Invalid("", f"expected a hostlist, got {value!r}", "write it like node[1-4,7]")
    names: list[str] = []
    for part in parts:
        try:
            names.extend(hostlists.expand(part))
        except ValidationError as exc:
            raise Invalid("", f"bad hostlist {part!r}", "write it like node[1-4,7]") from exc
    twice = [name for name, count in Counter(names).items() if count > 1]
    if twice:
        raise Invalid("", f"{nodes_text(twice)} listed twice", "list each node once")
    return tuple(names)


def expand_hostlist(value: object) -> tuple[str, ...]:
    """A hostlist as YAML holds it (``node[1-4]`` or a list of them) -> node names; ``Invalid`` if bad."""
    return _expand_hostlist(value)


HostList = Annotated[
    tuple[str, ...],
    BeforeValidator(_expand_hostlist),
    PlainSerializer(hostlists.collect, return_type=str),
]
"""Node names, written in YAML as a Slurm hostlist and kept expanded."""

Name = Annotated[str, Field(min_length=1)]
