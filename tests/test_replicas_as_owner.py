"""Replicas run as their owner, and only the service's own replicas are trusted, on the real cluster with
real users: alice serves through the API and her replica is her Slurm job (sacct: User=alice,
Account=acct-alice), in her 0700 folder with a 0600 secret, its engine a process of hers. bob's jobs tagged
as her replicas are never adopted nor routed to, and announcements that are not her replica's own (wrong
secret, bob's socket, another job) are refused and change nothing. Her engine answers /v1 only with its
engine key, which is in no command line nor in Slurm's view of the job."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from hpcserve.api.caller import Caller
from hpcserve.api.errors import Forbidden, Unauthenticated
from hpcserve.api.replicas import Announce, check_announce
from hpcserve.config import load_policy, load_site_config
from hpcserve.errors import SlurmCommandError
from hpcserve.jobs.runas import Owner, as_owner, owner_environ, owner_prefix
from hpcserve.jobs.submit import Submitter
from hpcserve.serving.engine_proc import engine_environ
from hpcserve.serving.gateway_store import routes_from_store
from hpcserve.serving.launcher import ReplicaLauncher, lookup_owner, prepare_replica_root, replica_folder
from hpcserve.serving.owner_files import encode_files
from hpcserve.serving.replica import ANNOUNCE_PATH, ReplicaCredentials, secret_file_name
from hpcserve.serving.tags import secret_hash
from hpcserve.slurm.cli_backend import CliSlurmClient
from hpcserve.slurm.runner import SubprocessRunner
from hpcserve.store import Deployment, Replica
from tests.api_fixtures import ApiService
from tests.conftest import POLICY, SITE, wait_until

SIM = {"model": "sim-model", "engine": "simulator", "gpus_per_replica": 1, "min_replicas": 1,
       "max_replicas": 1}  # fmt: skip


# ------------------------------------------------------------------------------ pure: argv building
def test_each_method_runs_the_command_as_the_owner() -> None:
    alice = Owner("alice", "alice")
    sbatch = ["sbatch", "--parsable"]
    assert as_owner("runuser", alice, sbatch) == ["runuser", "-u", "alice", "--", "sbatch", "--parsable"]
    assert as_owner("sudo", alice, sbatch) == ["sudo", "-n", "-u", "alice", "--", "sbatch", "--parsable"]
    assert as_owner("sbatch-uid", alice, sbatch) == ["sbatch", "--uid=alice", "--gid=alice", "--parsable"]
    assert owner_prefix("sbatch-uid", "alice") == ["runuser", "-u", "alice", "--"]  # its file helper


@pytest.mark.parametrize("name", ["-alice", "al/ice", "", "a b", "--uid=0"])
def test_an_owner_name_is_never_an_option_or_a_path(name: str) -> None:
    with pytest.raises(Exception, match="not a Unix account name"):
        owner_prefix("runuser", name)


def test_the_service_environment_never_reaches_the_owners_job() -> None:
    env = {"PATH": "/usr/bin", "SLURM_CONF": "/x", "HPCSERVE_DATABASE_URL": "postgresql://s:pw@db/h"}
    assert owner_environ(env) == {"PATH": "/usr/bin", "SLURM_CONF": "/x"}


def test_an_announcement_must_be_the_replicas_own() -> None:
    now = datetime.now(UTC)
    row = Replica("d", 0, None, "77", "starting", None, None, None, now, None, now, secret_hash("s3cret"))
    note = Announce("d", 0, "77", "node5", 8000)
    alice, bob = Caller(1001, "alice", frozenset()), Caller(1002, "bob", frozenset())
    check_announce(note, "s3cret", alice, "alice", row)  # her job, on the socket
    check_announce(note, "s3cret", None, "alice", row)  # over TCP: the secret is the proof
    refused = [
        (Unauthenticated, note, "guess", alice, "alice", row),
        (Unauthenticated, note, "s3cret", None, None, None),  # no such deployment
        (Unauthenticated, note, "s3cret", None, "alice", replace(row, secret_hash=None)),  # cancelled
        (Forbidden, note, "s3cret", bob, "alice", row),  # bob's process, even with the secret
        (Forbidden, replace(note, job_id="78"), "s3cret", None, "alice", row),  # another job
        (Forbidden, note, "s3cret", None, "alice", replace(row, state="draining")),
    ]
    for error, *args in refused:
        with pytest.raises(error):
            check_announce(*args)  # type: ignore[arg-type]


def test_the_credentials_file_holds_the_secret_and_the_engine_key() -> None:
    both = ReplicaCredentials("s3cret", "engine-key")
    assert ReplicaCredentials.decode(both.encode()) == both
    assert ReplicaCredentials.decode(b"s3cret\n") == ReplicaCredentials(
        "s3cret"
    )  # written before engine keys
    assert "s3cret" not in repr(both) and "engine-key" not in repr(both)


def test_the_engine_key_reaches_the_engine_in_its_environment() -> None:
    assert engine_environ({"PATH": "/bin"}, "engine-key") == {"PATH": "/bin", "VLLM_API_KEY": "engine-key"}
    assert engine_environ({"PATH": "/bin"}, None) == {"PATH": "/bin"}


# ------------------------------------------------------------- real users: the owner's folder and files
def run_files_helper(
    user: str, base: Path, deployment: str, files: dict[str, bytes]
) -> subprocess.CompletedProcess[str]:
    argv = ["runuser", "-u", user, "--", sys.executable, "-I", "-m", "hpcserve.serving.owner_files",
            str(base), deployment]  # fmt: skip
    return subprocess.run(argv, input=encode_files(files), capture_output=True, text=True, timeout=60,
                          check=False, cwd="/")  # fmt: skip


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A root-owned 0755 folder every user can enter."""
    root = Path(tempfile.mkdtemp(prefix="hps-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def base(scratch: Path) -> Path:
    return scratch / "replicas"


def test_files_are_written_by_the_owner_in_their_0700_folder(base: Path) -> None:
    prepare_replica_root(base, lookup_owner("alice"))
    folder = replica_folder(base, "alice", "dep")
    done = run_files_helper("alice", base, "dep", {"x.pkl": b"pickle", "replica-0.secret": b"s3"})
    assert done.returncode == 0, done.stderr
    alice = lookup_owner("alice").uid
    assert (base.stat().st_uid, stat.S_IMODE(base.stat().st_mode)) == (0, 0o755)
    for path, mode in ((folder.parent, 0o700), (folder, 0o700), (folder / "x.pkl", 0o600),
                       (folder / "replica-0.secret", 0o600)):  # fmt: skip
        info = path.lstat()
        assert (path.name, info.st_uid, stat.S_IMODE(info.st_mode)) == (path.name, alice, mode)
    assert (folder / "replica-0.secret").read_bytes() == b"s3"


def test_a_planted_symlink_is_replaced_not_followed(base: Path, scratch: Path) -> None:
    prepare_replica_root(base, lookup_owner("alice"))
    assert run_files_helper("alice", base, "dep", {}).returncode == 0
    target = scratch / "root-only"
    target.write_text("root's")
    target.chmod(0o600)
    link = replica_folder(base, "alice", "dep") / "replica-0.secret"
    subprocess.run(["runuser", "-u", "alice", "--", "ln", "-s", str(target), str(link)], check=True)
    assert run_files_helper("alice", base, "dep", {"replica-0.secret": b"new"}).returncode == 0
    assert target.read_text() == "root's" and not link.is_symlink() and link.read_bytes() == b"new"


def test_another_users_folder_under_an_owners_name_is_refused(base: Path) -> None:
    base.mkdir(mode=0o755)
    subprocess.run(["install", "-d", "-o", "bob", "-m", "0700", str(base / "alice")], check=True)
    with pytest.raises(Exception, match="belongs to uid"):
        prepare_replica_root(base, lookup_owner("alice"))
    done = run_files_helper("alice", base, "dep", {"x": b"y"})
    assert done.returncode != 0 and "not a folder this user may use" in done.stderr, done.stderr


# -------------------------------------------------------------------- the cluster: alice serves a model
@dataclass
class Served:
    service: ApiService
    name: str
    replica: Replica
    replica_dir: Path

    def store_replicas(self) -> list[Replica]:
        with self.service.store() as store:
            return store.replicas(self.name)


def call_as(service: ApiService, user: str, method: str, path: str, body: Any,
            headers: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """``ServiceClient.call`` on the service's socket from a process of ``user``: the answer, or
    ``{"status": N, "error": line}`` when the service refuses."""
    code = (
        "import json, sys; from hpcserve.service.client import ServiceClient, ServiceError\n"
        "a = json.load(sys.stdin)\n"
        "c = ServiceClient(a['socket'])\n"
        "try: print(json.dumps(c.call(a['method'], a['path'], a['body'], a['headers'])))\n"
        "except ServiceError as e: print(json.dumps({'status': e.status, 'error': str(e)}))\n"
    )
    args = {"socket": str(service.socket), "method": method, "path": path, "body": body, "headers": headers}
    done = subprocess.run(["runuser", "-u", user, "--", sys.executable, "-c", code], input=json.dumps(args),
                          capture_output=True, text=True, env=service.user_env(), timeout=60, check=False,
                          cwd="/")  # fmt: skip
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@pytest.fixture(scope="module")
def served(slurm_env: dict[str, str]) -> Iterator[Served]:
    """A service (as root, runuser) whose controller ticks every 0.5 s, and alice's deployment, served
    through the API with one replica, ready."""
    root = Path(tempfile.mkdtemp(prefix="hps-", dir="/tmp"))
    root.chmod(0o755)
    service = ApiService(root, slurm_env, f"sqlite:///{root / 'state' / 'hpcserve.db'}")
    site = yaml.safe_load(service.site.read_text())
    site["serving"] |= {"replica_dir": str(root / "replicas"), "controller_interval_s": 0.5,
                        "ready_timeout_s": 120}  # fmt: skip
    service.site.write_text(yaml.safe_dump(site))
    service.start("--sample-interval", "0", "--rebalance-interval", "0")
    name = f"own-{uuid.uuid4().hex[:6]}"
    try:
        service.wait_ready()
        created = call_as(service, "alice", "POST", "/v1/deployments", {"values": {"name": name, **SIM}})
        assert created.get("owner") == "alice", created

        def ready() -> list[Replica]:
            with service.store() as store:
                return [r for r in store.replicas(name) if r.state == "ready"]

        wait_until(lambda: bool(ready()), timeout=120, interval=0.5)
        yield Served(service, name, ready()[0], root / "replicas")
    finally:
        service.stop()
        leftovers = [j.id for j in CliSlurmClient().jobs() if j.tag and name in j.tag]
        if leftovers:
            subprocess.run(["scancel", *leftovers], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


pytestmark_cluster = pytest.mark.cluster


@pytestmark_cluster
def test_sacct_charges_the_replica_to_alice(served: Served, slurm: CliSlurmClient) -> None:
    job_id = str(served.replica.job_id)
    wait_until(lambda: bool(slurm.accounting([job_id])), timeout=30)
    (record,) = slurm.accounting([job_id])
    assert (record.user, record.account) == ("alice", "acct-alice")
    (job,) = [j for j in slurm.jobs() if j.id == job_id]
    assert (job.user, job.account, job.partition, job.gpus) == ("alice", "acct-alice", "infer", 1)


@pytestmark_cluster
def test_the_replicas_files_are_alices_and_private(served: Served) -> None:
    alice = lookup_owner("alice").uid
    folder = replica_folder(served.replica_dir, "alice", served.name)
    assert (served.replica_dir.stat().st_uid, stat.S_IMODE(served.replica_dir.stat().st_mode)) == (0, 0o755)
    for path in (folder.parent, folder):
        assert (path.stat().st_uid, stat.S_IMODE(path.stat().st_mode)) == (alice, 0o700)
    secret = folder / secret_file_name(served.replica.index)
    assert (secret.stat().st_uid, stat.S_IMODE(secret.stat().st_mode)) == (alice, 0o600)
    credentials = ReplicaCredentials.decode(secret.read_bytes())
    assert hashlib.sha256(credentials.secret.encode()).hexdigest() == served.replica.secret_hash
    assert credentials.engine_key and credentials.engine_key == served.replica.engine_key
    job_files = sorted(folder.glob(f"{served.replica.job_id}_*"))
    assert {p.name.removeprefix(f"{served.replica.job_id}_") for p in job_files} >= {"submitted.pkl",
                                                                                     "0_log.out"}  # fmt: skip
    assert all(p.stat().st_uid == alice for p in folder.iterdir()), [
        (p.name, p.stat().st_uid) for p in folder.iterdir()
    ]


def engine_pid(port: int) -> int:
    """The engine simulator serving on ``port`` (its command line names the port), found through /proc."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"engine-sim" in argv
            and b"--port" in argv
            and argv[argv.index(b"--port") + 1] == str(port).encode()
        ):
            return int(proc.name)
    raise AssertionError(f"no engine process serves port {port}")


@pytestmark_cluster
def test_the_engine_runs_as_alice(served: Served) -> None:
    assert served.replica.port is not None
    status = (Path("/proc") / str(engine_pid(served.replica.port)) / "status").read_text()
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert uids == [str(lookup_owner("alice").uid)] * 4  # real, effective, saved, filesystem


@pytestmark_cluster
def test_the_gateway_routes_to_the_ready_replica(served: Served) -> None:
    with served.service.store() as store:
        routes = routes_from_store(store)()
    assert served.replica.url is not None
    assert f"{served.replica.host}:{served.replica.port}" in served.replica.url
    assert served.replica.url in repr(routes)
    key = {"Authorization": f"Bearer {served.replica.engine_key}"}
    models = httpx.get(f"{served.replica.url}/v1/models", headers=key, timeout=10)
    assert models.status_code == 200 and served.name in models.text
    (route,) = [r for r in routes.values() if r.name == served.name]
    assert [(e.url, e.key) for e in route.endpoints] == [(served.replica.url, served.replica.engine_key)]


def http_as(user: str, url: str, method: str = "GET", body: Any = None, key: str | None = None) -> int:
    """The HTTP status a process of ``user`` on this login node gets from ``url``, with ``Authorization:
    Bearer <key>`` when a key is given (handed over on stdin, so no key is ever in a command line)."""
    code = (
        "import json, sys, urllib.request, urllib.error\n"
        "a = json.load(sys.stdin)\n"
        "data = None if a['body'] is None else json.dumps(a['body']).encode()\n"
        "r = urllib.request.Request(a['url'], data=data, method=a['method'], headers=a['headers'])\n"
        "try: print(urllib.request.urlopen(r, timeout=30).status)\n"
        "except urllib.error.HTTPError as e: print(e.code)\n"
    )
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    args = {"url": url, "method": method, "body": body, "headers": headers}
    argv = ["runuser", "-u", user, "--", sys.executable, "-I", "-c", code]
    done = subprocess.run(argv, cwd="/", input=json.dumps(args), capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytestmark_cluster
def test_alices_engine_answers_bob_only_with_its_engine_key(served: Served) -> None:
    """bob, a user on the login node, reaches alice's engine's port; without its engine key (none, or a
    guess) /v1 is refused, so nobody goes around the gateway's keys, tenancy and limits."""
    url, key = served.replica.url, served.replica.engine_key
    assert url and key
    chat = {"model": served.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/chat/completions", chat)):
        statuses = [http_as("bob", f"{url}{path}", method, body, k) for k in (None, "guessed", key)]
        assert statuses == [401, 401, 200], (path, statuses)
    assert http_as("bob", f"{url}/health") == 200  # health (and /metrics) stay open, as in vLLM


@pytestmark_cluster
def test_the_engine_key_is_in_no_command_line_nor_in_slurms_view_of_the_job(served: Served) -> None:
    assert served.replica.port is not None and served.replica.engine_key
    secret_path = replica_folder(served.replica_dir, "alice", served.name) / secret_file_name(0)
    credentials = ReplicaCredentials.decode(secret_path.read_bytes())
    key, secret = served.replica.engine_key.encode(), credentials.secret.encode()
    pid = engine_pid(served.replica.port)
    environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    assert b"VLLM_API_KEY=" + key in environ  # the engine's environment: its owner's (and root's) to read
    peek = subprocess.run(["runuser", "-u", "bob", "--", "cat", f"/proc/{pid}/environ"], capture_output=True,
                          check=False, timeout=30)  # fmt: skip
    assert peek.returncode != 0 and key not in peek.stdout
    cmdlines = []
    for proc in Path("/proc").iterdir():
        try:
            cmdlines.append((proc.name, (proc / "cmdline").read_bytes()))
        except OSError:
            continue
    assert str(pid) in dict(cmdlines)
    assert [n for n, argv in cmdlines if key in argv or secret in argv] == []
    job = str(served.replica.job_id)
    for argv in (["scontrol", "show", "job", "-dd", job], ["scontrol", "write", "batch_script", job, "-"]):
        shown = subprocess.run(argv, capture_output=True, check=True, timeout=30).stdout
        assert job.encode() in shown or b"#!" in shown, argv
        assert key not in shown and secret not in shown, argv


def submit_as_bob(tag: str) -> str:
    argv = ["runuser", "-u", "bob", "--", "sbatch", "--parsable", "--hold", "-p", "infer", "--gres=gpu:1",
            f"--comment={tag}", "-J", "not-a-replica", "--chdir=/tmp", "-o", "/dev/null",
            "--wrap", "sleep 600"]  # fmt: skip
    env = owner_environ(os.environ)
    return subprocess.run(
        argv, capture_output=True, text=True, check=True, env=env, timeout=30
    ).stdout.strip()


@pytestmark_cluster
def test_bobs_jobs_tagged_as_alices_replicas_are_never_adopted(served: Served, slurm: CliSlurmClient) -> None:
    ids = [submit_as_bob(f"hpcserve:replica:{served.name}:{index}") for index in (5, 0)]
    try:
        wait_until(lambda: all(f"ignoring job {i} " in served.service.log() for i in ids), timeout=30)
        replicas = served.store_replicas()
        assert [(r.index, r.job_id, r.state) for r in replicas] == [(0, served.replica.job_id, "ready")]
        queued = {j.id: j for j in slurm.jobs() if j.id in ids}
        assert sorted(queued) == sorted(ids)  # untouched: still queued, held
        assert all(j.user == "bob" and j.state.is_pending for j in queued.values())
        with served.service.store() as store:
            routes = repr(routes_from_store(store)())
        assert (
            served.replica.url is not None and served.replica.url in routes and "not-a-replica" not in routes
        )
    finally:
        slurm.cancel(ids)


def announce_tcp(served: Served, secret: str, **fields: Any) -> httpx.Response:
    body = {"deployment": served.name, "index": 0, "job_id": served.replica.job_id, "host": "evil", "port": 1,
            **fields}  # fmt: skip
    url = f"http://127.0.0.1:{served.service.port}{ANNOUNCE_PATH}"
    return httpx.post(url, json=body, headers={"Authorization": f"Replica {secret}"}, timeout=30)


@pytestmark_cluster
def test_forged_announcements_are_refused_and_change_nothing(served: Served) -> None:
    secret_path = replica_folder(served.replica_dir, "alice", served.name) / secret_file_name(0)
    secret = ReplicaCredentials.decode(secret_path.read_bytes()).secret  # root reads it: what else is checked
    before = served.store_replicas()
    forged = {"deployment": served.name, "index": 0, "job_id": served.replica.job_id, "host": "evil",
              "port": 1}  # fmt: skip

    assert announce_tcp(served, "not-the-secret").status_code == 401
    assert announce_tcp(served, secret, job_id="1").status_code == 403  # another job
    assert announce_tcp(served, secret, index=3).status_code == 401  # another replica
    no_secret = httpx.post(f"http://127.0.0.1:{served.service.port}{ANNOUNCE_PATH}", json=forged, timeout=30)
    assert no_secret.status_code == 401
    for bobs_secret in ("guessed", secret):  # bob on the socket: never alice's replica, secret or not
        answer = call_as(
            served.service, "bob", "POST", ANNOUNCE_PATH, forged, {"Authorization": f"Replica {bobs_secret}"}
        )
        assert answer.get("status") == 403, answer
    assert served.store_replicas() == before

    again = announce_tcp(served, secret, host=served.replica.host, port=served.replica.port)
    assert (
        again.status_code == 200 and again.json()["url"] == served.replica.url
    )  # over TCP the secret is the proof


# ------------------------------------------ the launcher alone: sbatch --uid, and Slurm's associations
def launcher(method: str, replica_dir: Path) -> ReplicaLauncher:
    return ReplicaLauncher(replica_dir, method, SubprocessRunner(env=owner_environ(os.environ)),
                           service_socket=None, service_url=None, ready_timeout_s=60)  # fmt: skip


def deployment(name: str, account: str | None) -> Deployment:
    now = datetime.now(UTC)
    spec = {"name": name, **SIM, "time_limit": "00:05:00"}
    return Deployment(name, "alice", spec, 1, 1, now, now, None, name, account)


@pytestmark_cluster
@pytest.mark.parametrize("method", ["sbatch-uid", "runuser"])
def test_the_launcher_submits_as_the_owner(method: str, base: Path, slurm: CliSlurmClient) -> None:
    from hpcserve.serving.spec import DeploymentSpec

    dep = deployment(f"uid-{uuid.uuid4().hex[:6]}", "acct-alice")
    submitter = Submitter(slurm, load_site_config(SITE), load_policy(POLICY))
    launched = launcher(method, base).launch(submitter, dep, DeploymentSpec.model_validate(dep.spec), 0)
    try:
        (job,) = [j for j in slurm.jobs() if j.id == launched.job_id]
        assert (job.user, job.account, job.tag) == ("alice", "acct-alice", f"hpcserve:replica:{dep.name}:0")
        secret = replica_folder(base, "alice", dep.name) / secret_file_name(0)
        assert secret.stat().st_uid == lookup_owner("alice").uid
        credentials = ReplicaCredentials.decode(secret.read_bytes())
        assert hashlib.sha256(credentials.secret.encode()).hexdigest() == launched.secret_hash
        assert credentials.engine_key == launched.engine_key and launched.engine_key
    finally:
        slurm.cancel([launched.job_id])


@pytestmark_cluster
def test_slurms_associations_refuse_an_account_that_is_not_the_owners(
    base: Path, slurm: CliSlurmClient
) -> None:
    from hpcserve.serving.spec import DeploymentSpec

    dep = deployment(f"acct-{uuid.uuid4().hex[:6]}", "acct-bob")
    submitter = Submitter(slurm, load_site_config(SITE), load_policy(POLICY))
    with pytest.raises(SlurmCommandError, match=r"(?i)account|association"):
        launcher("runuser", base).launch(submitter, dep, DeploymentSpec.model_validate(dep.spec), 0)
    assert not [j for j in slurm.jobs() if j.tag and dep.name in j.tag]
