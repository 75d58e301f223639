"""The README's "Installing at a site", followed on this machine under a temporary root instead of ``/``
(never the machine's own /etc/hpcserve): the service account, /etc/hpcserve (root's, 0644, admins there),
the database the service account creates (0600, bob kept out), the sudoers rule, the Postgres role, the
systemd units (``systemd-analyze verify``, and the settings the README promises) and munge for the service
account. The README's own yaml, sudoers and sql blocks are what the test installs."""

from __future__ import annotations

import json
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from sqlalchemy import create_engine, text

from hpcserve.api.caller import caller_for_uid, is_admin
from hpcserve.cli import main as cli_main
from hpcserve.store import HistoryStore
from hpcserve.store.migrate import head_revision
from tests.conftest import POLICY, REPO, SITE
from tests.store_helpers import PG_SERVER

README = REPO / "README.md"
UNITS = REPO / "site_configs" / "systemd"
ACCOUNT = "hpcserve"
INSTALLED_VENV = "/opt/hpcserve/venv"  # where the README installs hpcserve; the units name it


def section() -> str:
    text_ = README.read_text()
    start = text_.index("## Installing at a site\n")
    end = text_.index("\n## ", start + 1)
    return text_[start:end]


def block(lang: str) -> str:
    """The README section's one fenced block of ``lang``."""
    [found] = re.findall(rf"^```{lang}\n(.*?)^```$", section(), re.MULTILINE | re.DOTALL)
    return str(found)


def run(*argv: str, user: str | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
    prefix = ["runuser", "-u", user, "--"] if user else []
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, cwd="/", timeout=120,
                          check=False, input=input)  # fmt: skip


def mode_owner(path: Path) -> tuple[int, str]:
    st = path.stat()
    return stat.S_IMODE(st.st_mode), pwd.getpwuid(st.st_uid).pw_name


@dataclass(frozen=True)
class Site:
    root: Path
    etc: Path  # <root>/etc/hpcserve
    state: Path  # <root>/var/lib/hpcserve

    @property
    def site_file(self) -> Path:
        return self.etc / "site.yaml"


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    """Steps 1 and 2 (and what systemd's StateDirectory does), under a root every user may look into."""
    root = Path(tempfile.mkdtemp(prefix="hpcserve-site-", dir="/tmp"))
    root.chmod(0o755)
    try:
        ensure_account()
        yield Site(root, install_etc(root), install_state_dir(root))
    finally:
        shutil.rmtree(root)


def ensure_account() -> None:
    """Step 1: the system account (scripts/minicluster.sh made it here already)."""
    if run("getent", "passwd", ACCOUNT).returncode != 0:
        made = run("useradd", "--system", "--home-dir", "/var/lib/hpcserve", "--shell", "/usr/sbin/nologin",
                   ACCOUNT)  # fmt: skip
        assert made.returncode == 0, made.stderr


def install_etc(root: Path) -> Path:
    """Step 2: /etc/hpcserve, root's, 0755 with 0644 files; site.yaml is this cluster's with the README's
    admins, service and database settings over it."""
    etc, staging = root / "etc" / "hpcserve", root / "staging"
    staging.mkdir()
    data = yaml.safe_load(SITE.read_text())
    data.update(yaml.safe_load(block("yaml")))
    data["database"]["url"] = f"sqlite:///{root}/var/lib/hpcserve/hpcserve.db"
    (staging / "site.yaml").write_text(yaml.safe_dump(data))
    shutil.copy(POLICY, staging / "policy.yaml")
    (root / "etc").mkdir()
    for argv in (["install", "-d", "-m", "0755", "-o", "root", "-g", "root", str(etc)],
                 ["install", "-m", "0644", "-o", "root", "-g", "root", str(staging / "site.yaml"),
                  str(staging / "policy.yaml"), f"{etc}/"]):  # fmt: skip
        done = run(*argv)
        assert done.returncode == 0, done.stderr
    return etc


def install_state_dir(root: Path) -> Path:
    state = root / "var" / "lib" / "hpcserve"
    state.parent.mkdir(parents=True)
    done = run("install", "-d", "-m", "0700", "-o", ACCOUNT, "-g", ACCOUNT, str(state))
    assert done.returncode == 0, done.stderr
    return state


def hpcserve(site: Site, *args: str, user: str) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "hpcserve", "--site", str(site.site_file), "--policy",
               str(site.etc / "policy.yaml"), *args, user=user)  # fmt: skip


# ----------------------------------------------------------------------------------------------- steps 1, 2


def test_the_service_account_is_a_system_account_without_a_shell() -> None:
    ensure_account()
    entry = pwd.getpwnam(ACCOUNT)
    assert (
        entry.pw_uid < 1000 and entry.pw_shell == "/usr/sbin/nologin" and entry.pw_dir == "/var/lib/hpcserve"
    )


def test_etc_hpcserve_is_roots_and_readable_by_all(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    assert mode_owner(site.etc) == (0o755, "root")
    assert [mode_owner(site.etc / n) for n in ("site.yaml", "policy.yaml")] == [(0o644, "root")] * 2
    assert run("cat", str(site.site_file), user="bob").returncode == 0
    denied = run(sys.executable, "-c", f"open({str(site.site_file)!r}, 'a')", user="bob")
    assert "PermissionError" in denied.stderr
    # found with no flag and no environment, as /etc/hpcserve would be
    monkeypatch.setattr(cli_main, "SYSTEM_CONFIG_DIR", site.etc)
    monkeypatch.delenv("HPCSERVE_SITE", raising=False)
    monkeypatch.delenv("HPCSERVE_POLICY", raising=False)
    ctx = cli_main.Context(None, None, None)
    assert (ctx.site_path, ctx.policy_path) == (site.site_file, site.etc / "policy.yaml")
    loaded = ctx.require_site()
    ctx.load_policy(loaded)
    assert loaded.admins == ("alice", "@hpcadmin") and loaded.service.socket == "/run/hpcserve/api.sock"
    carol, bob = (caller_for_uid(pwd.getpwnam(u).pw_uid) for u in ("carol", "bob"))
    assert is_admin(carol, loaded.admins) and not is_admin(bob, loaded.admins)


# ----------------------------------------------------------------------------------------------- database


def test_the_service_account_owns_the_sqlite_database(site: Site) -> None:
    upgraded = hpcserve(site, "db", "upgrade", "--json", user=ACCOUNT)
    assert upgraded.returncode == 0, upgraded.stderr
    db = site.state / "hpcserve.db"
    assert mode_owner(site.state) == (0o700, ACCOUNT) and mode_owner(db) == (0o600, ACCOUNT)
    status = hpcserve(site, "db", "status", "--json", user=ACCOUNT)
    assert status.returncode == 0 and json.loads(status.stdout)["up_to_date"] is True, status.stderr
    refused = hpcserve(site, "rebalance", "--dry-run", user="bob")  # an admin command: it opens the database
    [line] = refused.stderr.splitlines()
    assert refused.returncode != 0 and "Permission denied" in line, refused.stderr


@pytest.mark.postgres
def test_the_readmes_postgres_role_owns_a_database_closed_to_public() -> None:
    name = f"hpcserve_site_{uuid.uuid4().hex[:10]}"
    statements = [s.strip() for s in re.sub(r"\bhpcserve\b", name, block("sql")).split(";") if s.strip()]
    admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement)
            public = conn.execute(
                text("SELECT has_database_privilege('public', :db, 'CONNECT')"), {"db": name}
            )
            assert public.scalar() is False
        upgraded = run(sys.executable, "-m", "hpcserve", "db", "upgrade", "--url",
                       f"postgresql+psycopg://{name}@127.0.0.1:5432/{name}", user=ACCOUNT)  # fmt: skip
        assert upgraded.returncode == 0, upgraded.stderr
        with HistoryStore(f"postgresql+psycopg://{name}@127.0.0.1:5432/{name}") as store:
            assert store.schema_status().current == head_revision()
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.exec_driver_sql(f'DROP ROLE IF EXISTS "{name}"')
        admin.dispose()
    hba = section()
    assert "scram-sha-256" in hba and "peer" in hba and "never `trust`" in hba


# ----------------------------------------------------------------------------------------------- step 3


def test_the_sudoers_rule_names_sbatch_and_the_owner_files_helper(site: Site) -> None:
    rule = block("sudoers")
    assert "/usr/bin/sbatch" in rule and "-I -m hpcserve.serving.owner_files" in rule and "!root" in rule
    staged = site.root / "sudoers-hpcserve"
    staged.write_text(rule)
    target = site.root / "etc" / "sudoers.d" / "hpcserve"
    target.parent.mkdir(exist_ok=True)
    done = run("install", "-m", "0440", "-o", "root", "-g", "root", str(staged), str(target))
    assert done.returncode == 0 and mode_owner(target) == (0o440, "root")
    if shutil.which("visudo") is None:
        pytest.skip("visudo is missing (apt-get install sudo): the rule's syntax is unchecked here")
    checked = run("visudo", "-cf", str(target))
    assert checked.returncode == 0, checked.stdout + checked.stderr


# ----------------------------------------------------------------------------------------------- step 5


def unit_settings(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a unit file (the last one wins, as systemd reads most keys)."""
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    return dict(ln.split("=", 1) for ln in lines if "=" in ln and not ln.startswith("#"))


@pytest.fixture
def installed_units(site: Site) -> Path:
    """Step 5's install commands, with ExecStart pointed at this checkout's venv (the README: "change it
    if yours differs")."""
    system = site.root / "etc" / "systemd" / "system"
    (system / "hpcserve.service.d").mkdir(parents=True, exist_ok=True)
    for rel in ("hpcserve.service", "hpcserve-gateway.service", "hpcserve.service.d/as-root.conf"):
        text_ = (UNITS / rel).read_text().replace(INSTALLED_VENV, sys.prefix)
        (system / rel).write_text(text_)
        (system / rel).chmod(0o644)
    return system


def test_the_units_verify_and_keep_their_promises(installed_units: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is missing: scripts/bootstrap.sh installs it (apt-get install systemd)")
    units = [installed_units / "hpcserve.service", installed_units / "hpcserve-gateway.service"]
    verified = run("systemd-analyze", "verify", *map(str, units))
    assert verified.returncode == 0 and verified.stdout + verified.stderr == "", verified.stderr
    service, gateway = (unit_settings(u) for u in units)
    root = unit_settings(installed_units / "hpcserve.service.d" / "as-root.conf")
    assert (
        service["ExecStart"] == f"{sys.prefix}/bin/hpcserve service"
        and Path(sys.prefix, "bin/hpcserve").exists()
    )
    assert (service["User"], service["RuntimeDirectory"], service["RuntimeDirectoryMode"]) == (
        ACCOUNT,
        "hpcserve",
        "0755",
    )
    assert (service["StateDirectory"], service["StateDirectoryMode"], service["UMask"]) == (
        "hpcserve",
        "0700",
        "0077",
    )
    assert service["NoNewPrivileges"] == "no"  # sudo is setuid
    assert (root["User"], root["NoNewPrivileges"]) == (
        "root",
        "yes",
    )  # runuser, sbatch --uid: root, no setuid
    assert (gateway["User"], gateway["NoNewPrivileges"], gateway["ProtectSystem"]) == (
        ACCOUNT,
        "yes",
        "strict",
    )
    assert "RuntimeDirectory" not in gateway  # stopping the gateway must not remove the service's socket
    exposure = run("systemd-analyze", "security", "--offline=yes", str(units[1]))
    level = re.search(r"Overall exposure level for \S+: ([\d.]+)", exposure.stdout + exposure.stderr)
    assert level is not None and float(level[1]) < 3.0, exposure.stdout


# ----------------------------------------------------------------------------------------------- step 6


def test_the_service_account_decodes_munge_credentials() -> None:
    cred = run("munge", "-n", user=ACCOUNT)
    assert cred.returncode == 0, cred.stderr
    decoded = run("unmunge", user=ACCOUNT, input=cred.stdout)
    uid = pwd.getpwnam(ACCOUNT).pw_uid
    assert decoded.returncode == 0 and re.search(
        rf"^UID:\s+{ACCOUNT} \({uid}\)$", decoded.stdout, re.MULTILINE
    )


def test_the_section_keeps_the_issues_order() -> None:
    text_ = section()
    steps = ["The service account", "`/etc/hpcserve`", "submitted as their owner", "The Postgres role",
             "the socket", "Other login nodes (munge)", "Shell completion"]  # fmt: skip
    where = [text_.index(s) for s in steps]
    assert where == sorted(where)
