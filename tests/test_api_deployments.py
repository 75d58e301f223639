"""Deployments, history, plans and admin actions through the service's API, as real Unix users on its real
socket: alice serves, bob sees her deployment but cannot change it (not even with his own --site naming him
admin), carol (group hpcadmin, an admin of the service) may; served names are unique; a model starting
with '-' and a warm tier outside the site's are refused; the GPU limits are each owner's own; and a user's
``serve`` never submits a job itself.

The service here runs its serving controller with a long interval (``serving.controller_interval_s``): it
ticks once at start, so what these tests create is never acted on and no replica job starts.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from hpcserve.rebalance.sampler import Sampler
from hpcserve.slurm.cli_backend import CliSlurmClient
from hpcserve.slurm.protocol import JobFilter
from hpcserve.store import NewStep
from tests.api_fixtures import ApiService, cancel_replicas, short_root  # noqa: F401 (fixtures)
from tests.conftest import POLICY

pytestmark = pytest.mark.cluster
LIMIT = 4  # the inference class's max_gpus_per_user (and max_gpus_per_job) here, over what users hold


def inference_gpus(user: str) -> int:
    """GPUs ``user`` holds or waits for in the inference partition now (other tests' jobs)."""
    jobs = CliSlurmClient(timeout=30).jobs(JobFilter(user=user, partitions=("infer",)))
    return sum(j.gpus for j in jobs if not j.state.is_terminal)


@pytest.fixture
def service(short_root: Path, slurm_env: dict[str, str]) -> Iterator[ApiService]:  # noqa: F811
    """The API service with a controller that never ticks again after its start, its own replica folder,
    and an inference class of at most ``LIMIT`` GPUs per user beyond what alice holds already in the
    inference partition (other tests' jobs: they count against her too)."""
    held = inference_gpus("alice")
    policy = yaml.safe_load(POLICY.read_text())
    policy["classes"]["inference"].update(max_gpus_per_job=LIMIT, max_gpus_per_user=LIMIT + held)
    (short_root / "policy.yaml").write_text(yaml.safe_dump(policy))
    svc = ApiService(short_root, slurm_env, f"sqlite:///{short_root}/state/hpcserve.db",
                     short_root / "policy.yaml")  # fmt: skip
    site = yaml.safe_load(svc.site.read_text())
    site["serving"] = {**site["serving"], "controller_interval_s": 3600,
                       "replica_dir": str(short_root / "replicas")}  # fmt: skip
    svc.site.write_text(yaml.safe_dump(site))
    svc.start("--sample-interval", "0", "--rebalance-interval", "0")
    try:
        svc.wait_ready()
        yield svc
    finally:
        svc.stop()
        cancel_replicas(svc)


def name(base: str) -> str:
    return f"{base}-{uuid.uuid4().hex[:6]}"


def serve(svc: ApiService, user: str, dep: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return svc.run_as(user, "serve", "sim-model", "--name", dep, "--engine", "simulator", *flags, "--json")


def refused(done: subprocess.CompletedProcess[str], *words: str) -> str:
    """The one error line of a refused command (non-zero exit), holding ``words``."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, (done.returncode, done.stderr)
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def call_as(svc: ApiService, user: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """(status, JSON) of one API request made by ``user`` on the socket (httpx in a runuser process)."""
    code = ("import json, sys, httpx; t = httpx.HTTPTransport(uds=sys.argv[1]); "
            "c = httpx.Client(transport=t, base_url='http://x', timeout=60); "
            "r = c.request(sys.argv[2], sys.argv[3], content=sys.argv[4].encode()); "
            "print(json.dumps([r.status_code, r.json()]))")  # fmt: skip
    argv = ["runuser", "-u", user, "--", sys.executable, "-c", code, str(svc.socket), method, path,
            "" if body is None else json.dumps(body)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=svc.user_env(), cwd="/", timeout=120,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    status, answer = json.loads(done.stdout)
    return int(status), answer


# ---------------------------------------------------------------------------------- ownership


def test_bob_sees_alices_deployment_but_cannot_change_it(service: ApiService) -> None:
    dep = name("alice-sim")
    made = serve(service, "alice", dep, "--min-replicas", "0", "--max-replicas", "2")
    assert made.returncode == 0, made.stderr
    [row] = json.loads(made.stdout)
    assert (row["name"], row["owner"], row["desired"]) == (dep, "alice", 0)

    listed = service.run_as("bob", "deployments", "--json")
    assert listed.returncode == 0, listed.stderr
    [seen] = [r for r in json.loads(listed.stdout) if r["name"] == dep]
    assert seen["owner"] == "alice" and seen["served_model_name"] == dep

    with service.store() as store:
        before = store.get_deployment(dep)
    bob_site = service.root / "bob-site.yaml"  # bob's own config, naming him admin: the service ignores it
    bob_site.write_text(yaml.safe_dump({**yaml.safe_load(service.site.read_text()), "admins": ["bob"]}))
    for args in (["scale", dep, "2"], ["scale", dep, "--max", "5"], ["share", dep, "bob"], ["rm", dep]):
        refused(service.run_as("bob", *args), "belongs to alice, not bob")
        refused(service.run_as("bob", "--site", str(bob_site), *args), "belongs to alice")
    refused(service.run_as("bob", "logs", dep), "belongs to alice")
    with service.store() as store:
        assert store.get_deployment(dep) == before

    scaled = service.run_as("carol", "scale", dep, "--max", "3", "--json")  # carol is in @hpcadmin
    assert scaled.returncode == 0, scaled.stderr
    assert json.loads(scaled.stdout)[0]["max_replicas"] == 3
    shared = service.run_as("alice", "share", dep, "bob", "@hpcadmin", "--json")
    assert shared.returncode == 0 and json.loads(shared.stdout)[0]["shares"] == ["bob", "@hpcadmin"]
    with service.store() as store:
        after = store.get_deployment(dep)
    assert after is not None and after.spec["max_replicas"] == 3 and after.shares == ["bob", "@hpcadmin"]
    assert after.owner == "alice"
    refused(service.run_as("alice", "share", dep, "nosuchuser"), "shares", "nosuchuser")


def test_served_names_are_unique_across_users(service: ApiService) -> None:
    dep = name("named")
    assert serve(service, "alice", dep, "--served-model-name", f"org/{dep}").returncode == 0
    refused(serve(service, "bob", name("copy"), "--served-model-name", f"org/{dep}"), "served_model_name",
            "already served")  # fmt: skip
    body = {"values": {"name": name("copy"), "model": "m", "engine": "simulator",
                       "served_model_name": f"org/{dep}"}}  # fmt: skip
    status, answer = call_as(service, "bob", "POST", "/v1/deployments", body)
    assert status == 409 and "already served" in answer["error"] and "\n" not in answer["error"]
    with service.store() as store:
        assert [d.owner for d in store.list_deployments()] == ["alice"]


def test_a_dash_model_and_a_foreign_warm_tier_are_refused(service: ApiService) -> None:
    dep = name("bad")
    argv = ("serve", "--name", dep, "--engine", "simulator", "--", "-x")
    refused(service.run_as("alice", *argv), "model", "'-x'")
    for tier in ("/tmp/elsewhere/{node}", "/tmp/hpcserve-mc/local/{node}/models/../../../../etc",
                 "/tmp/hpcserve-mc/local/{node}/modelsX"):  # fmt: skip
        refused(serve(service, "alice", dep, "--warm-tier", tier), "warm_tier")
    with service.store() as store:
        assert store.list_deployments() == []
    good = serve(service, "alice", dep, "--warm-tier", "/tmp/hpcserve-mc/local/{node}/models/alice")
    assert good.returncode == 0, good.stderr


# -------------------------------------------------------------------------------------- limits


def test_limits_are_each_owners_own_and_serve_submits_nothing(service: ApiService) -> None:
    rule = "policy classes.inference.max_gpus_per_user"
    first, second, bobs = name("a-one"), name("a-two"), name("b-one")
    made = serve(service, "alice", first, "--gpus-per-replica", "2", "--min-replicas", "2",
                 "--max-replicas", "4")  # fmt: skip
    assert made.returncode == 0, made.stderr
    refused(serve(service, "alice", second, "--gpus-per-replica", "1", "--min-replicas", "1"), rule, "alice")
    refused(service.run_as("alice", "scale", first, "3"), rule)
    refused(service.run_as("carol", "scale", first, "--min", "3"), rule)  # an admin: still alice's limits
    too_big = serve(service, "alice", second, "--gpus-per-replica", str(LIMIT + 1))
    refused(too_big, "policy classes.inference.max_gpus_per_job")
    assert serve(service, "alice", second, "--gpus-per-replica", "1").returncode == 0  # min 0: asks nothing
    bob = serve(service, "bob", bobs, "--gpus-per-replica", "2", "--min-replicas", "2", "--max-replicas", "2")
    assert bob.returncode == 0, bob.stderr  # alice's deployments do not count against bob
    assert service.run_as("alice", "scale", first, "1").returncode == 0  # going down is always fine

    with service.store() as store:
        wanted = {d.name: (d.owner, d.desired_replicas) for d in store.list_deployments()}
    assert wanted == {first: ("alice", 1), second: ("alice", 0), bobs: ("bob", 2)}
    # The old CLI ticked the controller itself and submitted replicas as the caller; now only the
    # service's controller does (and it does not tick again in this test): nobody's CLI submitted one.
    tags = tuple(f"hpcserve:replica:{d}:" for d in wanted)
    jobs = CliSlurmClient(timeout=30).jobs()
    assert [j.id for j in jobs if j.tag and j.tag.startswith(tags)] == []


# ---------------------------------------------------------------------------------------- logs


def test_logs_are_the_owners_and_never_follow_a_link(service: ApiService) -> None:
    dep = name("logged")
    assert serve(service, "alice", dep).returncode == 0
    refused(service.run_as("alice", "logs", dep), "no replica logs yet")
    with service.store() as store:
        store.upsert_replica(dep, 0, job_id="99999901", state="ready")
    alice = pwd.getpwnam("alice")
    folder = service.root / "replicas" / "alice" / dep
    folder.mkdir(parents=True)
    for path in (folder.parent, folder):
        os.chown(path, alice.pw_uid, alice.pw_gid)
        path.chmod(0o700)
    out, err, secret = folder / "99999901_0_log.out", folder / "99999901_0_log.err", service.root / "secret"
    secret.write_text("root only\n")
    secret.chmod(0o600)
    out.write_text("engine started\nready on port 8000\n")
    os.chown(out, alice.pw_uid, alice.pw_gid)
    err.symlink_to(secret)  # alice's trick to make the service read a root-only file: not followed
    os.lchown(err, alice.pw_uid, alice.pw_gid)

    read = service.run_as("alice", "logs", dep)
    assert read.returncode == 0, read.stderr
    assert read.stdout == "engine started\nready on port 8000\n" and "root only" not in read.stdout
    refused(service.run_as("bob", "logs", dep), "belongs to alice")
    assert service.run_as("carol", "logs", dep, "--replica", "0").stdout == read.stdout


# ----------------------------------------------------------------------------- history, plans, admin


def test_history_and_plans_are_everyones_to_read(service: ApiService) -> None:
    with service.store() as store:  # the service's sampler, twice: 3 partitions x 2 samples
        sampler = Sampler(CliSlurmClient(timeout=30), store)
        sampler.tick()
        sampler.tick()
        moves = [{"node": "node5", "src": "inference", "dst": "training"}]
        steps = [NewStep("node5", "inference", "training", "drain")]
        store.create_plan("test plan", moves, steps, "done", holder="test:1")
    table = service.run_as("bob", "history", "--since", "1h")
    assert table.returncode == 0 and "6 samples" in table.stdout and "infer" in table.stdout, table.stderr
    listed = service.run_as("bob", "history", "--since", "1h", "-p", "infer", "--limit", "1", "--json")
    [sample] = json.loads(listed.stdout)
    assert sample["partition"] == "infer" and sample["total_gpus"] > 0
    out = service.root / "bob"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    plotted = service.run_as("bob", "history", "--since", "1h", "--plot", str(out / "h.png"))
    assert plotted.returncode == 0 and "6 samples" in plotted.stdout, plotted.stderr
    assert (out / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plans = service.run_as("bob", "rebalance", "--plans", "--json")
    assert plans.returncode == 0, plans.stderr
    [plan] = json.loads(plans.stdout)
    assert plan["reason"] == "test plan" and plan["holder"] == "test:1"


def test_admin_actions_are_for_admins_only(service: ApiService) -> None:
    for path, body in (("/v1/admin/rebalance", {"dry_run": True}),
                       ("/v1/admin/move", {"node": "node5", "to": "training", "dry_run": True}),
                       ("/v1/admin/drain", {"node": "node5", "reason": "bob was here"})):  # fmt: skip
        status, answer = call_as(service, "bob", "POST", path, body)
        assert status == 403 and "for admins" in answer["error"] and "\n" not in answer["error"], answer
    for admin in ("carol", "root"):
        status, answer = call_as(service, admin, "POST", "/v1/admin/rebalance", {"dry_run": True})
        assert status == 200 and answer["dry_run"] is True and "target_inference_nodes" in answer["plan"]
    moved = []  # node5 is on one side now (other tests may have moved it): a dry run to each side
    for side in ("training", "inference"):
        wanted = {"node": "node5", "to": side, "dry_run": True}
        status, answer = call_as(service, "carol", "POST", "/v1/admin/move", wanted)
        assert status == 200, answer
        moved += [m["dst"] for m in answer["plan"]["moves"] if m["node"] == "node5"]
    assert len(moved) == 1, moved
    status, answer = call_as(service, "carol", "POST", "/v1/admin/move",
                             {"node": "node1", "to": "inference", "dry_run": True})  # fmt: skip
    assert status == 400 and "not in the site's managed pool" in answer["error"], answer
    status, answer = call_as(service, "carol", "POST", "/v1/admin/drain", {"node": "node99", "reason": "x"})
    assert status == 400 and "not a node of this cluster" in answer["error"], answer
    with service.store() as store:
        assert store.plans() == []  # dry runs store nothing
