"""The only place hpcserve runs Slurm's commands. Commands are argv lists; nothing goes through a shell.

Light on imports on purpose (no typing, dataclasses or models; ``re`` only once a command has run): the
console entry point uses it to start ``squeue`` before anything else loads (see hpcserve/cli/entry.py).
The interface clients depend on is ``hpcserve.slurm.protocol.CommandRunner``.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from functools import cache

from hpcserve.errors import SlurmCommandError

DEFAULT_TIMEOUT_S = 30.0
# Output is decoded with errors="replace": a job name is any bytes a user chose, and one that is not UTF-8
# must not stop squeue's output from being read for everyone else.
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy treats the name the same way
if TYPE_CHECKING:
    import re

    EnvChanges = Mapping[str, str | None]


def failed(returncode: int, stderr: str) -> bool:
    """Slurm's clients sometimes exit 0 after printing ``<command>: error: ...`` (squeue -u for an unknown
    user, scancel --verbose of an unknown job id): such a line is a failure too; ``warning:`` is not."""
    return returncode != 0 or (bool(stderr) and _slurm_error().search(stderr) is not None)


@cache
def _slurm_error() -> re.Pattern[str]:
    import re

    return re.compile(r"^\S+: error: ", re.MULTILINE)


class CommandResult:
    """What a command printed. A plain slotted class: typing's NamedTuple would cost an import here."""

    __slots__ = ("argv", "returncode", "stderr", "stdout")

    def __init__(self, argv: tuple[str, ...], returncode: int, stdout: str, stderr: str) -> None:
        self.argv, self.returncode, self.stdout, self.stderr = argv, returncode, stdout, stderr


class SubprocessRunner:
    """Runs commands with subprocess. A non-zero exit, a timeout or a missing program raise
    :class:`SlurmCommandError` carrying the command, the return code and stderr."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env = dict(env) if env is not None else None
        self._started: dict[tuple[str, ...], Iterator[str]] = {}

    def __call__(self, argv: Sequence[str], *, timeout: float, stdin: str | None = None) -> CommandResult:
        # Popen + a watchdog rather than subprocess.run(timeout=): with a timeout, Python waits for the
        # child's exit in a sleep-and-poll loop, which added about 0.4 ms to every sbatch.
        try:
            proc = subprocess.Popen(
                list(argv), stdin=None if stdin is None else subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, env=self._env, errors="replace",
            )  # fmt: skip
        except FileNotFoundError as exc:
            raise _not_found(argv) from exc
        with _Watchdog(proc, timeout) as watchdog:
            stdout, stderr = proc.communicate(stdin)
        if watchdog.expired:
            raise SlurmCommandError(argv, None, f"no answer after {timeout:g}s")
        if failed(proc.returncode, stderr):
            raise SlurmCommandError(argv, proc.returncode, stderr)
        return CommandResult(tuple(argv), proc.returncode, stdout, stderr)

    def prestart(self, argv: Sequence[str], *, timeout: float, env: EnvChanges | None = None) -> None:
        """Start a command now whose output will be asked for later with the same argv (and env)."""
        self._started[tuple(argv)] = self.lines(argv, timeout=timeout, env=env)

    def lines(self, argv: Sequence[str], *, timeout: float, env: EnvChanges | None = None) -> Iterator[str]:
        """Start the command (unless prestarted) and yield its stdout lines as they arrive, so the caller
        works while the command still runs. The exit status is checked when the output ends. ``env``
        changes the runner's environment for this command: a value sets a variable, None unsets it."""
        started = self._started.pop(tuple(argv), None)
        if started is not None:
            return started
        try:
            proc = subprocess.Popen(
                list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1 << 16,
                env=self._environ(env), errors="replace",
            )  # fmt: skip
        except FileNotFoundError as exc:
            raise _not_found(argv) from exc
        return _stream(proc, argv, timeout)

    def _environ(self, changes: EnvChanges | None) -> dict[str, str] | None:
        if not changes:
            return self._env
        env = dict(os.environ if self._env is None else self._env)
        for key, value in changes.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env


class _Watchdog:
    """Kills ``proc`` if it is still running ``timeout`` seconds after the ``with`` block starts."""

    def __init__(self, proc: subprocess.Popen[str], timeout: float) -> None:
        self._proc, self._fired = proc, threading.Event()
        self._timer = threading.Timer(timeout, self._expire)

    @property
    def expired(self) -> bool:
        return self._fired.is_set()

    def _expire(self) -> None:
        self._fired.set()
        self._proc.kill()

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        if self._proc.poll() is None:  # the caller stopped early, or the block raised
            self._proc.kill()
            self._proc.wait()


def _stream(proc: subprocess.Popen[str], argv: Sequence[str], timeout: float) -> Iterator[str]:
    with _Watchdog(proc, timeout) as watchdog:
        assert proc.stdout is not None and proc.stderr is not None
        yield from proc.stdout
        stderr = proc.stderr.read()
        returncode = proc.wait()
    if watchdog.expired:
        raise SlurmCommandError(argv, None, f"no answer after {timeout:g}s")
    if failed(returncode, stderr):
        raise SlurmCommandError(argv, returncode, stderr)


def _not_found(argv: Sequence[str]) -> SlurmCommandError:
    return SlurmCommandError(argv, 127, f"{argv[0]}: command not found (is Slurm installed?)")
