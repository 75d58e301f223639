"""One error family for everything hpcserve reports to a user.

Every message is one line that says what failed and how to fix it. The CLI prints ``str(err)`` and exits
non-zero; it never shows a traceback for these.
"""

from __future__ import annotations

from collections.abc import Sequence


class HpcserveError(Exception):
    """Base class: a failure the user can act on."""

    exit_code = 1


class ConfigError(HpcserveError):
    """A site config or policy file is invalid. The message names the file, the field and the fix."""

    def __init__(self, path: str, field: str, problem: str, fix: str = "") -> None:
        self.path, self.field, self.problem, self.fix = path, field, problem, fix
        where = f"{path}: {field}" if field else path
        super().__init__(f"{where}: {problem}" + (f" (fix: {fix})" if fix else ""))


class SlurmCommandError(HpcserveError):
    """A Slurm command failed, timed out or could not be started.

    ``returncode`` is the process's exit status, ``None`` when it timed out and 127 when the program
    was not found; ``reason`` is the line of stderr that explains the failure.
    """

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.argv, self.returncode, self.stderr = tuple(argv), returncode, stderr.strip()
        lines = self.stderr.splitlines() or ["no error output"]
        self.reason = next((line for line in lines if "error" in line.lower()), lines[0])
        status = {None: "timed out", 0: "reported an error"}.get(returncode, f"exited {returncode}")
        super().__init__(f"`{_short_command(self.argv)}` {status}: {self.reason}")


def _short_command(argv: Sequence[str], width: int = 40) -> str:
    """The command for a message: long arguments (squeue's format string) cut to ``width`` characters."""
    import shlex  # only when a message is made: it loads re, and errors.py is on the CLI's start path

    return shlex.join(a if len(a) <= width else a[: width - 3] + "..." for a in argv)


class SlurmParseError(HpcserveError):
    """Slurm printed something the parser does not understand (a version or format mismatch)."""


class ValidationError(HpcserveError):
    """A user-supplied value is invalid: the message names the field and the fix."""

    exit_code = 2
