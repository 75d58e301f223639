"""``hpcserve doctor``: is everything hpcserve depends on reachable and valid? Each check says ok or fail,
and a failure carries the fix."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hpcserve.errors import HpcserveError, SlurmCommandError
from hpcserve.slurm.cli_backend import CliSlurmClient
from hpcserve.slurm.protocol import CommandRunner

if TYPE_CHECKING:
    from hpcserve.config import SiteConfig
    from hpcserve.slurm.preempt_conf import LiveSlurm

CHECK_TIMEOUT_S = 15.0
LOCAL_START = "on the local cluster: scripts/minicluster.sh start"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass(frozen=True, slots=True)
class DoctorInput:
    runner: CommandRunner
    site_path: Path | None
    policy_path: Path | None


def run_checks(inp: DoctorInput) -> list[Check]:
    site, config_check = _check_config(inp.site_path, inp.policy_path)
    cluster = site.cluster if site else None
    slurm = _check_slurm(inp.runner)
    return [
        slurm,
        _check_munge(inp.runner),
        _check_accounting(inp.runner, cluster),
        config_check,
        *_check_lending(inp.runner, site if slurm.ok else None),  # Slurm down: its own line says so
        _check_service(site),
        _check_database(site),
    ]


def _guard(name: str, fix: str, body: Callable[[], Check]) -> Check:
    """Run one check; any hpcserve error becomes a failed check with the given fix."""
    try:
        return body()
    except SlurmCommandError as exc:
        return Check(name, False, exc.reason, fix)
    except HpcserveError as exc:
        text = str(exc)  # a message that names its own fix already keeps only that one
        return Check(name, False, text, "" if "(fix:" in text else fix)


def _check_slurm(runner: CommandRunner) -> Check:
    ping = CliSlurmClient(runner, timeout=CHECK_TIMEOUT_S).ping()
    fix = f"start slurmctld and point SLURM_CONF at its slurm.conf; {LOCAL_START}"
    return Check(
        "slurm", ping.ok, ping.detail.splitlines()[0] if ping.detail else "no answer", "" if ping.ok else fix
    )


def _check_munge(runner: CommandRunner) -> Check:
    def body() -> Check:
        cred = runner(["munge", "-n"], timeout=CHECK_TIMEOUT_S).stdout
        runner(["unmunge"], timeout=CHECK_TIMEOUT_S, stdin=cred)
        return Check("munge", True, "a credential made by munge -n decodes with unmunge")

    return _guard("munge", f"start munged with the cluster's /etc/munge/munge.key; {LOCAL_START}", body)


def _check_accounting(runner: CommandRunner, cluster: str | None) -> Check:
    fix = f"start slurmdbd and register the cluster (sacctmgr add cluster NAME); {LOCAL_START}"

    def body() -> Check:
        out = runner(["sacctmgr", "-n", "-P", "show", "cluster", "format=cluster"], timeout=CHECK_TIMEOUT_S)
        names = out.stdout.split()
        if cluster and cluster not in names:
            return Check("accounting", False, f"cluster {cluster!r} is not registered in slurmdbd", fix)
        return Check("accounting", True, f"slurmdbd answers; clusters: {', '.join(names) or 'none'}")

    return _guard("accounting", fix, body)


def _check_config(site_path: Path | None, policy_path: Path | None) -> tuple[SiteConfig | None, Check]:
    from hpcserve.config import check_policy, load_policy, load_site_config

    if site_path is None:
        return None, Check("config", False, "no site config", "pass --site FILE or set HPCSERVE_SITE")
    try:
        site = load_site_config(site_path)
        if policy_path is None:
            return site, Check("config", False, f"{site_path} is valid; no policy",
                               "pass --policy FILE or set HPCSERVE_POLICY")  # fmt: skip
        check_policy(load_policy(policy_path), site, policy_path)
    except HpcserveError as exc:
        return None, Check("config", False, str(exc), "edit the file as the message says")
    return site, Check("config", True, f"{site_path} and {policy_path} are valid")


def _check_lending(runner: CommandRunner, site: SiteConfig | None) -> list[Check]:
    """The live slurm.conf (and QOS) against the site's ``lending`` section: one FAIL line per mismatch
    (none without a valid site config or an answering Slurm: their own checks fail then)."""
    from hpcserve.config.lending import lending_mismatches, summary

    if site is None:
        return []
    try:
        found = lending_mismatches(site, _read_live_slurm(runner, site.lending.preempt == "qos"))
    except HpcserveError as exc:
        detail = exc.reason if isinstance(exc, SlurmCommandError) else str(exc)
        return [Check("lending", False, detail, f"start slurmctld and slurmdbd; {LOCAL_START}")]
    if not found:
        return [Check("lending", True, summary(site))]
    return [Check("lending", False, m.problem, m.fix) for m in found]


def _read_live_slurm(runner: CommandRunner, with_qos: bool) -> LiveSlurm:
    from hpcserve.slurm import preempt_conf as pc

    def read(argv: tuple[str, ...]) -> str:
        return runner(list(argv), timeout=CHECK_TIMEOUT_S).stdout

    qos = read(pc.SHOW_QOS_ARGV) if with_qos else None
    return pc.live_slurm(read(pc.SHOW_CONFIG_ARGV), read(pc.SHOW_PARTITIONS_ARGV), qos)


def _check_service(site: SiteConfig | None) -> Check:
    """The service's API answers, and says who the caller is (the kernel's word, over the socket)."""
    from hpcserve.service.client import ServiceClient

    client = ServiceClient.for_site(site)
    fix = "ask your admin to start it (systemctl start hpcserve), or set service.socket / $HPCSERVE_SOCKET"

    def body() -> Check:
        me = client.call("GET", "/v1/whoami")
        role = "an admin" if me.get("admin") else "not an admin"
        return Check("service", True, f"answers at {client.where}: you are {me.get('user')} ({role})")

    return _guard("service", fix, body)


def _check_database(site: SiteConfig | None) -> Check:
    if site is None:
        return Check(
            "database", False, "no valid site config to read database.url from", "fix the config first"
        )
    url = site.database_url()
    if _the_services_own(url):
        return Check(
            "database", True, f"{_redact(url)} is the service's alone (users reach it through the API)"
        )
    fix = "check database.url (SQLite: a writable folder; Postgres: server up, user known)"
    try:
        _ping_database(url)
    except Exception as exc:  # the driver's own error types vary; all mean "unreachable"
        return Check("database", False, f"{_redact(url)}: {str(exc).splitlines()[0]}", fix)
    return Check("database", True, f"{_redact(url)} answers")


def _the_services_own(url: str) -> bool:
    """A SQLite database that exists but that the caller may not open: the service's, as it should be."""
    import os

    if not url.startswith("sqlite:///"):
        return False
    path = Path(url.removeprefix("sqlite:///"))
    try:
        path.stat()
    except PermissionError:  # in the service's 0700 folder
        return True
    except OSError:
        return False
    return not os.access(path, os.R_OK | os.W_OK)


def _ping_database(url: str) -> None:
    import sqlalchemy

    if url.startswith("sqlite:///"):
        from hpcserve.store.engine import create_private

        create_private(Path(url.removeprefix("sqlite:///")))  # 0600 in a 0700 folder, like the store's
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
    finally:
        engine.dispose()


def _redact(url: str) -> str:
    """Hide a password in a database URL."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"
