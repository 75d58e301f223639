"""The service owns the database: a SQLite file hpcserve creates is 0600 in a 0700 folder, owned by whoever
ran it, and the real user bob cannot open it; on PostgreSQL only the service's role connects (bob's own
role is refused); and no command but ``hpcserve db upgrade`` and ``hpcserve service`` migrates: the others
stop with one line naming ``hpcserve db upgrade``."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from hpcserve.cli.main import Context
from hpcserve.config import load_site_config
from hpcserve.store import HistoryStore, SchemaOutOfDate
from hpcserve.store.migrate import head_revision
from tests.conftest import POLICY, SITE
from tests.store_helpers import PG_SERVER

PEEK = "import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute(sys.argv[2]).fetchall())"


def as_user(user: str, *argv: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``argv`` run as the real Unix ``user`` (runuser), from a folder every user may enter."""
    return subprocess.run(["runuser", "-u", user, "--", *argv], capture_output=True, text=True, cwd="/",
                          env=dict(env or os.environ), timeout=120, check=False)  # fmt: skip


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder every user may look into (pytest's own tmp_path is root's 0700: bob could not even reach a
    file there, and the test would prove nothing about the file)."""
    path = Path(tempfile.mkdtemp(prefix="hpcserve-owner-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_a_new_sqlite_database_is_0600_in_a_0700_folder(shared_dir: Path) -> None:
    db = shared_dir / "state" / "hpcserve.db"
    with HistoryStore(f"sqlite:///{db}") as store:
        store.upgrade()
        store.put_state("probe", {"written": True})  # a write: the -wal and -shm files exist now
        files = [db, db.with_name("hpcserve.db-wal"), db.with_name("hpcserve.db-shm")]
        assert all(f.exists() for f in files)
        assert mode(db.parent) == 0o700 and [mode(f) for f in files] == [0o600] * 3


def test_bob_cannot_open_the_services_sqlite_file(shared_dir: Path) -> None:
    db = shared_dir / "hpcserve.db"  # in a folder bob can read: only the file's own mode keeps him out
    with HistoryStore(f"sqlite:///{db}") as store:
        store.upgrade()
        store.put_state("probe", {"written": True})
    for sql in ("SELECT name FROM deployments", "INSERT INTO locks VALUES ('rebalance', 'bob', 0)"):
        peek = as_user("bob", sys.executable, "-c", PEEK, str(db), sql)
        assert peek.returncode != 0 and "unable to open database file" in peek.stderr, peek.stderr
    raw = as_user("bob", sys.executable, "-c", f"open({str(db)!r}, 'rb')")
    assert "PermissionError" in raw.stderr and "Permission denied" in raw.stderr
    env = {**os.environ, "HPCSERVE_SITE": str(SITE), "HPCSERVE_POLICY": str(POLICY),
           "HPCSERVE_DATABASE_URL": f"sqlite:///{db}"}  # fmt: skip
    cli = as_user("bob", sys.executable, "-m", "hpcserve", "rebalance", "--dry-run", env=env)
    [line] = cli.stderr.splitlines()
    assert cli.returncode != 0 and "unable to open database file" in line, cli.stderr
    with HistoryStore(f"sqlite:///{db}") as store:
        assert store.lock_holder("rebalance") is None and store.get_state("probe") == {"written": True}


def test_an_older_world_readable_database_is_closed_when_its_owner_opens_it(shared_dir: Path) -> None:
    mine, theirs = shared_dir / "mine.db", shared_dir / "theirs.db"
    for db in (mine, theirs):
        sqlite3.connect(db).close()  # what an older hpcserve left: 0644 under the usual umask
        db.chmod(0o644)
    account = pwd.getpwnam("hpcserve")
    os.chown(theirs, account.pw_uid, account.pw_gid)
    for db in (mine, theirs):
        with HistoryStore(f"sqlite:///{db}") as store:
            store.schema_status()
    assert (mode(mine), mode(theirs)) == (0o600, 0o644)  # someone else's file is not the caller's to change


def test_the_service_account_owns_the_database_it_creates(shared_dir: Path) -> None:
    home = shared_dir / "lib"  # what systemd's StateDirectory=hpcserve makes: the service account's folder
    home.mkdir()
    account = pwd.getpwnam("hpcserve")
    os.chown(home, account.pw_uid, account.pw_gid)
    url = f"sqlite:///{home}/db/hpcserve.db"
    code = f"from hpcserve.store import HistoryStore; print(HistoryStore({url!r}).upgrade())"
    made = as_user("hpcserve", sys.executable, "-c", code)
    assert made.returncode == 0 and made.stdout.strip() == head_revision(), made.stderr
    db = home / "db" / "hpcserve.db"
    assert db.stat().st_uid == account.pw_uid and mode(db) == 0o600 and mode(db.parent) == 0o700
    assert db.parent.stat().st_uid == account.pw_uid
    peek = as_user("bob", sys.executable, "-c", PEEK, str(db), "SELECT 1")
    assert peek.returncode != 0 and "unable to open database file" in peek.stderr


# ------------------------------------------------------------------------------ no migration on every call


def test_commands_do_not_migrate_and_name_db_upgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/hpcserve.db"
    env = {**os.environ, "HPCSERVE_SITE": str(SITE), "HPCSERVE_POLICY": str(POLICY),
           "HPCSERVE_DATABASE_URL": url}  # fmt: skip

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hpcserve", *args], capture_output=True, text=True,
                              env=env, timeout=120, check=False)  # fmt: skip

    empty = cli("rebalance", "--dry-run")  # an admin command that opens the database itself
    [line] = empty.stderr.splitlines()
    assert empty.returncode == 1 and "is empty" in line and "`hpcserve db upgrade`" in line, line
    with HistoryStore(url) as store:
        assert store.schema_status().current is None  # nothing was migrated by the command
        store.upgrade("0002")
    behind = cli("rebalance", "--dry-run", "--json")
    [line] = behind.stderr.splitlines()
    assert behind.returncode == 1 and "at schema revision 0002" in line and "hpcserve db upgrade" in line
    with HistoryStore(url) as store:
        assert store.schema_status().current == "0002"
    upgraded = cli("db", "upgrade")  # HPCSERVE_DATABASE_URL names the database, as for every command
    assert upgraded.returncode == 0 and f"upgraded from 0002 to {head_revision()}" in upgraded.stdout
    status = cli("db", "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["up_to_date"] is True, status.stderr


def test_only_the_owner_migrates_through_the_context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCSERVE_DATABASE_URL", f"sqlite:///{tmp_path}/hpcserve.db")
    ctx, site = Context(SITE, POLICY, None), load_site_config(SITE)
    with pytest.raises(SchemaOutOfDate, match="hpcserve db upgrade"):
        ctx.store(site)
    with ctx.store(site, migrate=True) as store:  # what `hpcserve service` does at start
        assert store.schema_status().up_to_date
    with ctx.store(site) as store:
        assert store.get_state("anything") is None


@pytest.mark.cluster
def test_the_service_migrates_an_empty_database_at_start(tmp_path: Path, slurm_env: dict[str, str]) -> None:
    url = f"sqlite:///{tmp_path}/hpcserve.db"
    env = {**slurm_env, "HPCSERVE_SITE": str(SITE), "HPCSERVE_POLICY": str(POLICY),
           "HPCSERVE_DATABASE_URL": url}  # fmt: skip
    argv = [sys.executable, "-m", "hpcserve", "service", "--once", "--sample-interval", "0",
            "--rebalance-interval", "0", "--metrics-port", "0"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    with HistoryStore(url) as store:
        assert store.schema_status().up_to_date


# ------------------------------------------------------------------------ PostgreSQL: the service's role


@pytest.fixture
def service_database() -> Iterator[tuple[str, str]]:
    """A scratch database owned by a new login role that only the service uses, closed to PUBLIC
    (``REVOKE CONNECT``), and a role ``bob`` as a user might have: (service role, database). Dropped
    after, with ``bob`` if this test made it."""
    suffix = uuid.uuid4().hex[:10]
    role, name = f"hpcserve_svc_{suffix}", f"hpcserve_owned_{suffix}"
    admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        had_bob = conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = 'bob'")).first() is not None
        if not had_bob:
            conn.exec_driver_sql("CREATE ROLE bob LOGIN")
        conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE')
        conn.exec_driver_sql(f'CREATE DATABASE "{name}" OWNER "{role}"')
        conn.exec_driver_sql(f'REVOKE CONNECT, TEMPORARY ON DATABASE "{name}" FROM PUBLIC')
    try:
        yield role, name
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.exec_driver_sql(f'DROP ROLE IF EXISTS "{role}"')
            if not had_bob:
                conn.exec_driver_sql("DROP ROLE IF EXISTS bob")
        admin.dispose()


@pytest.mark.postgres
def test_only_the_services_role_connects_to_its_postgres_database(service_database: tuple[str, str]) -> None:
    role, name = service_database
    url = f"postgresql+psycopg://{role}@127.0.0.1:5432/{name}"
    with HistoryStore(url) as store:
        assert store.upgrade() == head_revision()
        store.put_state("rebalance:planner", {"cycles": 1})
        assert store.get_state("rebalance:planner") == {"cycles": 1}
        with store.engine.connect() as conn:
            owners = set(conn.execute(text("SELECT tableowner FROM pg_tables WHERE schemaname = 'public'")))
    assert owners == {(role,)}
    bob_url = f"postgresql://bob@127.0.0.1:5432/{name}"
    raw = as_user("bob", sys.executable, "-c", f"import psycopg; psycopg.connect({bob_url!r})")
    assert raw.returncode != 0 and f'permission denied for database "{name}"' in raw.stderr, raw.stderr
    env = {**os.environ, "HPCSERVE_SITE": str(SITE), "HPCSERVE_POLICY": str(POLICY),
           "HPCSERVE_DATABASE_URL": bob_url}  # fmt: skip
    cli = as_user("bob", sys.executable, "-m", "hpcserve", "rebalance", "--dry-run", env=env)
    [line] = cli.stderr.splitlines()
    assert cli.returncode != 0 and "permission denied for database" in line, cli.stderr


@pytest.mark.postgres
@pytest.mark.cluster
def test_the_service_on_postgres_serves_users_with_its_own_role(
    service_database: tuple[str, str], short_root: Path, slurm_env: dict[str, str]
) -> None:
    """The whole path on PostgreSQL: the service connects as its role (and migrates the empty database at
    start); alice serves through the API; the row lands in the service's database; bob, connecting as
    himself, is refused by PostgreSQL."""
    from tests.api_fixtures import ApiService, cancel_replicas

    role, name = service_database
    service = ApiService(short_root, slurm_env, f"postgresql+psycopg://{role}@127.0.0.1:5432/{name}")
    service.start("--sample-interval", "0", "--rebalance-interval", "0")
    try:
        service.wait_ready()
        made = service.run_as(
            "alice", "serve", "pg-llm", "--engine", "simulator", "--min-replicas", "0", "--json"
        )
        assert made.returncode == 0, made.stderr
        listed = service.run_as("bob", "deployments", "--json")
        assert [(d["name"], d["owner"]) for d in json.loads(listed.stdout)] == [("pg-llm", "alice")]
    finally:
        service.stop()
        cancel_replicas(service)
    with HistoryStore(service.db_url) as store:
        assert [(d.name, d.owner) for d in store.list_deployments()] == [("pg-llm", "alice")]
    bob_url = f"postgresql://bob@127.0.0.1:5432/{name}"
    raw = as_user("bob", sys.executable, "-c", f"import psycopg; psycopg.connect({bob_url!r})")
    assert raw.returncode != 0 and "permission denied for database" in raw.stderr
