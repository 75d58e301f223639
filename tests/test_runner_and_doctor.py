"""The command runner's error mapping (real subprocesses), squeue argv building, and the doctor's database
check against SQLite and the real PostgreSQL on 127.0.0.1:5432."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from hpcserve.config import DatabaseSettings, SiteConfig, load_site_config
from hpcserve.doctor import _check_database, _redact
from hpcserve.errors import SlurmCommandError, ValidationError
from hpcserve.slurm.commands import squeue_argv
from hpcserve.slurm.protocol import JobFilter
from hpcserve.slurm.runner import SubprocessRunner
from tests.conftest import SITE

PY = sys.executable


def test_runner_returns_output() -> None:
    result = SubprocessRunner()(
        [PY, "-c", "import sys; print(sys.stdin.read().upper())"], timeout=10, stdin="hi"
    )
    assert (result.returncode, result.stdout) == (0, "HI\n")


def test_runner_nonzero_exit_carries_command_code_and_stderr() -> None:
    argv = [PY, "-c", "import sys; sys.stderr.write('squeue: error: Invalid user\\n'); sys.exit(3)"]
    with pytest.raises(SlurmCommandError) as err:
        SubprocessRunner()(argv, timeout=10)
    assert (err.value.argv, err.value.returncode, err.value.stderr) == (
        tuple(argv),
        3,
        "squeue: error: Invalid user",
    )
    assert "exited 3: squeue: error: Invalid user" in str(err.value) and "\n" not in str(err.value)


def test_runner_timeout_and_missing_program() -> None:
    with pytest.raises(SlurmCommandError) as err:
        SubprocessRunner()([PY, "-c", "import time; time.sleep(5)"], timeout=0.3)
    assert err.value.returncode is None and "timed out" in str(err.value)
    with pytest.raises(SlurmCommandError) as missing:
        SubprocessRunner()(["hpcserve-no-such-program"], timeout=5)
    assert missing.value.returncode == 127 and "command not found" in missing.value.stderr


def test_jobs_argv_passes_filters_to_squeue() -> None:
    argv = squeue_argv(
        JobFilter(user="alice", states=("PD", "R"), partitions=("train",), job_ids=("12", "13_2"))
    )
    assert argv[:4] == ["squeue", "-h", "-a", "-r"]  # the format goes in SQUEUE_FORMAT2 (squeue_env)
    assert argv[4:] == ["--user=alice", "--states=PD,R", "--partition=train", "--jobs=12,13_2"]
    with pytest.raises(ValidationError, match="not a Slurm job id"):
        squeue_argv(JobFilter(job_ids=("12,13",)))


def with_database(url: str) -> SiteConfig:
    return load_site_config(SITE).model_copy(update={"database": DatabaseSettings(url=url)})


def test_doctor_database_sqlite(tmp_path: Path) -> None:
    check = _check_database(with_database(f"sqlite:///{tmp_path}/state/hpcserve.db"))
    assert check.ok and (tmp_path / "state" / "hpcserve.db").exists()


@pytest.mark.postgres
def test_doctor_database_postgres() -> None:
    assert _check_database(with_database("postgresql+psycopg://postgres@127.0.0.1:5432/test")).ok
    bad = _check_database(with_database("postgresql+psycopg://postgres:secret@127.0.0.1:1/test"))
    assert not bad.ok and "database.url" in bad.fix
    assert "secret" not in bad.detail and "postgres:***@127.0.0.1:1" in bad.detail


def test_redact_keeps_urls_without_password() -> None:
    assert _redact("sqlite:////var/lib/hpcserve.db") == "sqlite:////var/lib/hpcserve.db"
    assert _redact("postgresql://u:p@h/db") == "postgresql://u:***@h/db"


def test_lines_streams_and_checks_exit_status_at_the_end() -> None:
    argv = [PY, "-c", "import sys; print('a'); print('b', flush=True); sys.stderr.write('boom'); sys.exit(4)"]
    got: list[str] = []
    with pytest.raises(SlurmCommandError) as err:
        got.extend(SubprocessRunner().lines(argv, timeout=10))
    assert got == ["a\n", "b\n"] and err.value.returncode == 4 and err.value.stderr == "boom"


def test_lines_timeout_kills_the_command() -> None:
    argv = [PY, "-c", "import time; print('x', flush=True); time.sleep(30)"]
    with pytest.raises(SlurmCommandError) as err:
        list(SubprocessRunner().lines(argv, timeout=0.5))
    assert err.value.returncode is None and "no answer after 0.5s" in str(err.value)


def test_prestart_runs_before_it_is_asked_for() -> None:
    argv = [PY, "-c", "import time; print(time.time())"]
    runner = SubprocessRunner()
    runner.prestart(argv, timeout=10)
    time.sleep(1.0)
    asked = time.time()
    (started,) = [float(x) for x in runner.lines(argv, timeout=10)]
    assert started < asked - 0.5  # the command ran during the sleep, not when asked
    (later,) = [float(x) for x in runner.lines(argv, timeout=10)]  # a second ask starts a new process
    assert later >= asked


@pytest.mark.parametrize(
    ("stderr", "fails"),
    [("squeue: error: Invalid user: nosuchuser\n", True), ("sbatch: warning: job name truncated\n", False),
     ("", False)],
)  # fmt: skip
def test_slurm_error_line_with_exit_0_is_a_failure(stderr: str, fails: bool) -> None:
    argv = [PY, "-c", f"import sys; sys.stderr.write({stderr!r})"]
    if fails:
        with pytest.raises(SlurmCommandError, match="reported an error: squeue: error: Invalid user"):
            SubprocessRunner()(argv, timeout=10)
        with pytest.raises(SlurmCommandError):
            list(SubprocessRunner().lines(argv, timeout=10))
    else:
        assert SubprocessRunner()(argv, timeout=10).returncode == 0
