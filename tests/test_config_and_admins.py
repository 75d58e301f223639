"""Where the site config and policy come from (``--site``/``--policy``, then ``HPCSERVE_SITE``/
``HPCSERVE_POLICY``, then ``/etc/hpcserve``: here a folder the test points ``SYSTEM_CONFIG_DIR`` at, never
the machine's own), and who is an admin: users by name, or Unix groups as ``@group`` (the real users carol,
in hpcadmin, and bob)."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import click
import pytest

from hpcserve.api.caller import Caller, caller_for_uid, is_admin
from hpcserve.cli import main as cli_main

WHERE = "where"


@pytest.fixture
def where(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Path, list[tuple[Path | None, ...]]]:
    """A system config folder holding site.yaml and policy.yaml, and a command ``hpcserve where`` (added to
    the real CLI for this test) that records the paths the real Context resolved."""
    system = tmp_path / "etc-hpcserve"
    system.mkdir()
    for name in ("site.yaml", "policy.yaml"):
        (system / name).write_text("# not read by this test\n")
    monkeypatch.setattr(cli_main, "SYSTEM_CONFIG_DIR", system)
    monkeypatch.delenv("HPCSERVE_SITE", raising=False)
    monkeypatch.delenv("HPCSERVE_POLICY", raising=False)
    seen: list[tuple[Path | None, ...]] = []

    @click.command(WHERE)
    @cli_main.pass_ctx
    def record(ctx: cli_main.Context) -> None:
        seen.append((ctx.site_path, ctx.policy_path))

    monkeypatch.setitem(cli_main.cli.commands, WHERE, record)
    return system, seen


def test_flags_then_environment_then_the_system_folder(
    where: tuple[Path, list[tuple[Path | None, ...]]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    system, seen = where
    mine, theirs = tmp_path / "mine.yaml", tmp_path / "env.yaml"
    cli_main.main([WHERE])
    monkeypatch.setenv("HPCSERVE_SITE", str(theirs))
    cli_main.main([WHERE])
    monkeypatch.setenv("HPCSERVE_POLICY", str(theirs))
    cli_main.main(["--site", str(mine), WHERE])
    cli_main.main(["--site", str(mine), "--policy", str(mine), WHERE])
    assert seen == [
        (system / "site.yaml", system / "policy.yaml"),  # nothing given: /etc/hpcserve
        (theirs, system / "policy.yaml"),  # the environment over /etc/hpcserve, one file at a time
        (mine, theirs),  # a flag over the environment
        (mine, mine),
    ]


def test_no_system_files_means_no_config_and_a_fix_to_pass_one(
    where: tuple[Path, list[tuple[Path | None, ...]]], capsys: pytest.CaptureFixture[str]
) -> None:
    system, seen = where
    for name in ("site.yaml", "policy.yaml"):
        (system / name).unlink()
    cli_main.main([WHERE])
    assert seen == [(None, None)]
    with pytest.raises(SystemExit) as failed:
        cli_main.main(["rebalance", "--dry-run"])
    assert failed.value.code == 2
    assert capsys.readouterr().err == "error: no site config (fix: pass --site or set HPCSERVE_SITE)\n"


# ----------------------------------------------------------------------------------------------- admins

CAROL, BOB = pwd.getpwnam("carol"), pwd.getpwnam("bob")


def test_callers_come_with_all_their_groups() -> None:
    carol, bob = caller_for_uid(CAROL.pw_uid), caller_for_uid(BOB.pw_uid)
    assert carol == Caller(CAROL.pw_uid, "carol", frozenset({"carol", "hpcadmin"}))
    assert bob == Caller(BOB.pw_uid, "bob", frozenset({"bob"}))
    assert caller_for_uid(4_000_123) == Caller(4_000_123, "4000123", frozenset())  # no passwd entry


def test_admins_are_named_as_users_or_groups() -> None:
    carol, bob = caller_for_uid(CAROL.pw_uid), caller_for_uid(BOB.pw_uid)
    assert is_admin(carol, ["@hpcadmin"]) and not is_admin(bob, ["@hpcadmin"])
    assert is_admin(bob, ["alice", "bob"]) and not is_admin(carol, ["alice", "bob"])
    assert is_admin(bob, ["@bob"])  # his primary group
    assert not is_admin(carol, ["hpcadmin", "@carol2", "@", ""])  # a group only with its @
    assert not is_admin(caller_for_uid(0), ["@hpcadmin", "bob"])  # root is an admin only when named


@pytest.mark.parametrize(("user", "expected"), [("carol", "True"), ("bob", "False")])
def test_the_kernels_uid_of_a_real_user_decides(user: str, expected: str) -> None:
    code = ("import os; from hpcserve.api.caller import caller_for_uid, is_admin; "
            "print(is_admin(caller_for_uid(os.getuid()), ['@hpcadmin', 'alice']))")  # fmt: skip
    out = subprocess.run(["runuser", "-u", user, "--", sys.executable, "-c", code], capture_output=True,
                         text=True, cwd="/", env=dict(os.environ), timeout=60, check=True)  # fmt: skip
    assert out.stdout.strip() == expected
