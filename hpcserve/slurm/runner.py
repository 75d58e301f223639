"""The only place hpcserve runs Slurm's commands. Commands are argv lists; nothing goes through a shell."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from hpcserve.errors import SlurmCommandError


@dataclass(frozen=True, slots=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class CommandRunner(Protocol):
    """Runs one argv list. Injected into clients so tests of pure logic can swap it."""

    def __call__(self, argv: Sequence[str], *, timeout: float, stdin: str | None = None) -> CommandResult: ...


@dataclass(frozen=True, slots=True)
class SubprocessRunner:
    """Runs commands with subprocess; a non-zero exit, a timeout or a missing program raise
    :class:`SlurmCommandError` carrying the command, the return code and stderr."""

    env: Mapping[str, str] | None = None

    def __call__(self, argv: Sequence[str], *, timeout: float, stdin: str | None = None) -> CommandResult:
        try:
            proc = subprocess.run(
                list(argv),
                input=stdin,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=dict(self.env) if self.env is not None else None,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise SlurmCommandError(argv, None, f"no answer after {timeout:g}s") from exc
        except FileNotFoundError as exc:
            raise SlurmCommandError(argv, 127, f"{argv[0]}: command not found (is Slurm installed?)") from exc
        if proc.returncode != 0:
            raise SlurmCommandError(argv, proc.returncode, proc.stderr)
        return CommandResult(tuple(argv), proc.returncode, proc.stdout, proc.stderr)
