"""The off tier's removal of warm copies: which copies a deployment staged where (pure), when they go (only
off, with no replica left, never one another deployment still needs), the service's record of them (a
real SQLite store), the cleanup job submitted as the owner on each node (its sbatch argv and script), the
same cleanup once a deployment or a pool is removed with ``rm`` (its row gone with its last replica, the
record kept with the owner until every job is submitted; through the controller too), and the job's
helper (removes only folders with hpcserve's staging manifest). The cluster test is
test_warm_copies_cluster.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from hpcserve.config import load_policy
from hpcserve.jobs.policy import resolve
from hpcserve.jobs.runas import Owner
from hpcserve.jobs.spec import JobRequest, ResolvedJob
from hpcserve.serving.staging import MANIFEST, hold_warm_copy, lock_path, stage_weights
from hpcserve.serving.tiers import Tier
from hpcserve.serving.unstage import STATE_PREFIX, Unstager, cleanup_script
from hpcserve.serving.warm_cleanup import main as cleanup_main
from hpcserve.serving.warm_copies import CopyOwner, Staged, own_folder, plan_removal, warm_copy
from hpcserve.slurm.models import Job, JobState
from hpcserve.slurm.runner import CommandResult
from hpcserve.store import Deployment, HistoryStore
from tests.conftest import POLICY

NOW = datetime(2026, 12, 7, 22, 0, tzinfo=UTC)
WARM = "/local/{node}/models"


# ------------------------------------------------------------------------------------------------ pure
def test_the_warm_copy_is_the_warm_tier_of_the_node_and_the_model_folders_name() -> None:
    assert warm_copy(WARM, "/cold/org/tiny", "node5") == "/local/node5/models/tiny"
    assert warm_copy(WARM, "/cold/org/tiny/", "node5") == "/local/node5/models/tiny"
    assert warm_copy(None, "/cold/tiny", "node5") is None  # no warm tier: nothing staged
    assert warm_copy(WARM, "org/tiny", "node5") is None  # a hub id: the engine downloads it
    assert warm_copy(WARM, "/", "node5") is None and warm_copy(WARM, "/cold/tiny", "") is None
    mine = "/local/{node}/{user}"  # each user's own folder in shared scratch
    assert warm_copy(mine, "/cold/tiny", "node5", "alice") == "/local/node5/alice/tiny"
    assert warm_copy(mine, "/cold/tiny", "node5") is None  # whose, unknown: nothing to name
    assert own_folder("/local/{node}/{user}/models", "node5", "alice") == "/local/node5/alice"
    assert own_folder("/scratch/u-{user}", "node5", "bob") == "/scratch/u-bob"
    assert own_folder(WARM, "node5", "alice") is None


def test_the_record_adds_seen_copies_forgets_nodes_and_reads_back() -> None:
    staged = Staged().with_seen([("node6", "/l/6/a"), ("node5", "/l/5/a"), ("node5", "/l/5/b")])
    assert staged.nodes == {"node5": ("/l/5/a", "/l/5/b"), "node6": ("/l/6/a",)}
    assert staged.with_seen([("node5", "/l/5/a")]) == staged
    assert staged.without("node5").nodes == {"node6": ("/l/6/a",)}
    assert staged.without("node5", ["/l/5/a"]).nodes == {"node5": ("/l/5/b",), "node6": ("/l/6/a",)}
    assert Staged.from_json(staged.to_json()) == staged
    assert Staged.from_json({"node5": "x", "node6": [1], "node7": []}) == Staged()
    owned = staged.owned_by(CopyOwner("alice", "acct", "infer"))
    assert Staged.from_json(owned.to_json()) == owned and owned.without("node5").owner == owned.owner
    assert owned.with_seen([("node9", "/l/9/a")]).owner == owned.owner
    assert Staged.from_json({"node5": ["/l/5/a"]}) == Staged({"node5": ("/l/5/a",)})  # written before owners
    assert Staged.from_json({"nodes": {"node5": ["/l/5/a"]}, "owner": {"user": 3}}).owner is None


def test_copies_go_only_once_off_with_no_replica_and_never_one_another_deployment_needs() -> None:
    staged = Staged().with_seen([("node5", "/l/5/a"), ("node6", "/l/6/a")])
    for tier in (Tier.HOT, Tier.WARM, Tier.COLD):
        assert plan_removal(staged, tier, 0, frozenset()).remove == {}
    assert plan_removal(staged, Tier.OFF, 1, frozenset()).remove == {}  # a replica (starting) stages again
    assert plan_removal(staged, Tier.OFF, 0, frozenset()).remove == {
        "node5": ("/l/5/a",),
        "node6": ("/l/6/a",),
    }
    shared = plan_removal(staged, Tier.OFF, 0, frozenset({("node6", "/l/6/a"), ("node7", "/x")}))
    assert shared.remove == {"node5": ("/l/5/a",)} and shared.shared == {("node6", "/l/6/a")}


# ------------------------------------------------------------------ the service's record and its jobs
class Runner:
    """Records each command (as the owner) and answers sbatch with a job id, or fails on ``fail`` nodes."""

    def __init__(self, fail: Sequence[str] = ()) -> None:
        self.calls: list[tuple[list[str], str | None]] = []
        self.fail = fail

    def __call__(self, argv: Sequence[str], *, timeout: float, stdin: str | None = None) -> CommandResult:
        self.calls.append((list(argv), stdin))
        if any(f"--nodelist={node}" in argv for node in self.fail):
            raise RuntimeError("sbatch: error: Batch job submission failed")
        return CommandResult(tuple(argv), 0, f"{700 + len(self.calls)}\n", "")


class Launcher:
    """The launcher's fields the unstager reads."""

    def __init__(self, runner: Runner) -> None:
        self.runner, self.method, self.python, self.timeout_s = runner, "runuser", "/venv/bin/python", 30.0
        self.replica_dir, self.storage, self.is_dir = Path("/srv/replicas"), None, os.path.isdir

    def owner_of(self, user: str) -> Owner:
        return Owner(user, user)


class Planner:
    """The submitter's policy step (the real policy of the minicluster)."""

    def plan(self, request: JobRequest, *, kind: str) -> tuple[ResolvedJob, str]:
        return resolve(request, load_policy(POLICY), kind=kind), "one node: Slurm chooses it"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HistoryStore]:
    with HistoryStore(f"sqlite:///{tmp_path}/h.db", admins=["root"]) as s:  # the service is an admin
        s.upgrade()
        yield s


def serve(store: HistoryStore, name: str, model: str = "/cold/tiny", **spec: Any) -> Deployment:
    return store.create_deployment(name, "alice", {"name": name, "model": model, "engine": "simulator",
                                                   "warm_tier": WARM, **spec}, 1)  # fmt: skip


def recorded(store: HistoryStore, name: str) -> dict[str, Any] | None:
    """The copies the service keeps for ``name``: node -> folders (None: no record)."""
    state = store.get_state(f"{STATE_PREFIX}{name}")
    return None if state is None else state["nodes"]


def ready(store: HistoryStore, name: str, index: int, host: str, kind: str = "copied") -> None:
    phases = {"staging": {"kind": kind, "seconds": 1.0, "bytes": 10, "hashed_bytes": 10}}
    store.upsert_replica(name, index, job_id=str(100 + index), state="ready", host=host, port=8000,
                         url=f"http://{host}:8000", phases=phases)  # fmt: skip


def running(index: int, *nodes: str) -> Job:
    return Job(
        str(100 + index), 100 + index, "r", "alice", "acct", "infer", JobState.RUNNING, len(nodes), nodes
    )


def test_the_service_remembers_where_ready_replicas_staged(store: HistoryStore) -> None:
    llm = serve(store, "llm")
    ready(store, "llm", 0, "node5")
    ready(store, "llm", 1, "node6")
    ready(store, "llm", 2, "node7", kind="none")  # its phases say it staged nothing
    store.upsert_replica("llm", 3, job_id="103", state="starting")
    unstager = Unstager(store, Launcher(Runner()))  # type: ignore[arg-type]
    unstager.begin([llm])
    jobs = {1: running(1, "node6", "node8")}  # a replica over two nodes: both staged
    unstager.note(llm, store.replicas("llm"), jobs, None)
    expected = {"node5": ["/local/node5/models/tiny"], "node6": ["/local/node6/models/tiny"],
                "node8": ["/local/node8/models/tiny"]}  # fmt: skip
    assert store.get_state(f"{STATE_PREFIX}llm") == {
        "nodes": expected,
        "owner": {"user": "alice", "account": None, "partition": None},
    }
    again = Unstager(store, Launcher(Runner()))  # type: ignore[arg-type]
    again.begin([llm])  # a restarted service reads it back
    assert again.records == {"llm": Staged.from_json(expected).owned_by(CopyOwner("alice"))}
    again.begin([])  # the deployment is gone: its copies are still to clean up
    assert again.gone == {"llm"} and recorded(store, "llm") == expected


def test_a_warm_tier_with_user_is_recorded_in_the_owners_folder(store: HistoryStore) -> None:
    llm = serve(store, "llm", warm_tier="/local/{node}/{user}")
    ready(store, "llm", 0, "node5")
    unstager = Unstager(store, Launcher(Runner()))  # type: ignore[arg-type]
    unstager.begin([llm])
    unstager.note(llm, store.replicas("llm"), {}, None)
    assert recorded(store, "llm") == {"node5": ["/local/node5/alice/tiny"]}


def test_a_record_kept_without_its_owner_gets_it_or_is_forgotten_once_gone(store: HistoryStore) -> None:
    spec = {"name": "llm", "model": "/cold/tiny", "partition": "infer"}
    llm = store.create_deployment("llm", "alice", spec, 1, account="acct")
    for name in ("llm", "old"):  # as the service wrote them before it kept owners
        store.put_state(f"{STATE_PREFIX}{name}", {"node5": ["/local/node5/models/tiny"]})
    unstager = Unstager(store, Launcher(Runner()))  # type: ignore[arg-type]
    unstager.begin([llm])
    assert store.get_state(f"{STATE_PREFIX}llm") == {
        "nodes": {"node5": ["/local/node5/models/tiny"]},
        "owner": {"user": "alice", "account": "acct", "partition": "infer"},
    }
    assert store.get_state(f"{STATE_PREFIX}old") is None and unstager.gone == set()  # no one to run as


def test_a_pool_remembers_each_members_copy(store: HistoryStore) -> None:
    pool = store.create_deployment("p", "alice", {"kind": "pool", "name": "p", "max_awake": 1}, 1)
    store.upsert_replica(
        "p", 0, job_id="100", state="ready", host="node5", port=9000, url="http://node5:9000"
    )
    member = {"engine": "simulator", "warm_tier": WARM, "pool": "p"}
    members = [{"name": "a", "model": "/cold/a", **member}, {"name": "b", "model": "org/b", **member}]
    unstager = Unstager(store, Launcher(Runner()))  # type: ignore[arg-type]
    unstager.begin([pool])
    unstager.note(pool, store.replicas("p"), {}, members)
    assert recorded(store, "p") == {"node5": ["/local/node5/models/a"]}


def test_off_submits_one_cleanup_job_per_node_as_the_owner_and_forgets_those_nodes(
    store: HistoryStore,
) -> None:
    llm = serve(store, "llm")
    runner = Runner(fail=["node6"])
    unstager = Unstager(store, Launcher(runner))  # type: ignore[arg-type]
    unstager.begin([llm])
    ready(store, "llm", 0, "node5")
    ready(store, "llm", 1, "node6")
    unstager.note(llm, store.replicas("llm"), {}, None)
    for index in (0, 1):
        store.remove_replica("llm", index)
    unstager.tidy(llm, Tier.COLD, 0, Planner())  # type: ignore[arg-type]
    assert runner.calls == []  # cold: the copies are what makes the next start fast
    unstager.tidy(llm, Tier.OFF, 0, Planner())  # type: ignore[arg-type]
    (argv, script), _failed = runner.calls
    assert argv[:5] == ["runuser", "-u", "alice", "--", "sbatch"]
    assert {
        "--nodelist=node5",
        "--gres=none",
        "--partition=infer",
        "--comment=hpcserve:unstage:llm-unstage",
        "--output=/srv/replicas/alice/llm/unstage-%j.out",
        "--chdir=/srv/replicas/alice/llm",
    } <= set(argv)
    assert script == cleanup_script("/venv/bin/python", ["/local/node5/models/tiny"])
    assert script.endswith("-I -m hpcserve.serving.warm_cleanup /local/node5/models/tiny\n")
    assert recorded(store, "llm") == {"node6": ["/local/node6/models/tiny"]}  # tried again
    runner.fail = []
    unstager.tidy(llm, Tier.OFF, 0, Planner())  # type: ignore[arg-type]
    assert "--nodelist=node6" in runner.calls[-1][0] and store.get_state(f"{STATE_PREFIX}llm") is None
    unstager.tidy(llm, Tier.OFF, 0, Planner())  # type: ignore[arg-type]
    assert len(runner.calls) == 3  # nothing left to remove


def test_a_copy_another_live_deployment_staged_is_left_on_disk(store: HistoryStore) -> None:
    one, two = serve(store, "one"), serve(store, "two")  # the same model in the same warm tier
    runner = Runner()
    unstager = Unstager(store, Launcher(runner))  # type: ignore[arg-type]
    unstager.begin([one, two])
    for name in ("one", "two"):
        ready(store, name, 0, "node5")
        unstager.note(store.get_deployment(name), store.replicas(name), {}, None)  # type: ignore[arg-type]
    unstager.tidy(one, Tier.OFF, 0, Planner())  # type: ignore[arg-type]
    assert runner.calls == [] and store.get_state(f"{STATE_PREFIX}one") is None
    assert recorded(store, "two") == {"node5": ["/local/node5/models/tiny"]}


# ------------------------------------------------------------------- a deployment removed with rm
def staged_and_removed(store: HistoryStore, unstager: Unstager, name: str, *hosts: str) -> None:
    """``name``'s replicas ready on ``hosts`` and noted, then ``rm``: the row goes with its last replica."""
    for index, host in enumerate(hosts):
        ready(store, name, index, host)
    unstager.begin(store.list_deployments())
    unstager.note(store.get_deployment(name), store.replicas(name), {}, None)  # type: ignore[arg-type]
    assert store.delete_deployment(name, user="alice") is False  # replicas left: the row stays, deleted
    unstager.begin(store.list_deployments())
    assert unstager.gone == set()  # still listed: its replicas are stopping
    for index in range(len(hosts)):
        store.remove_replica(name, index)
    assert store.get_deployment(name) is None


def test_rm_removes_the_copies_as_the_owner_once_the_row_is_gone_and_retries_a_failed_submit(
    store: HistoryStore,
) -> None:
    serve(store, "llm", partition="infer")
    runner = Runner(fail=["node6"])
    unstager = Unstager(store, Launcher(runner))  # type: ignore[arg-type]
    staged_and_removed(store, unstager, "llm", "node5", "node6")
    assert runner.calls == []
    unstager.begin(store.list_deployments())
    unstager.tidy_gone(Planner())  # type: ignore[arg-type]
    (argv, script), _failed = runner.calls
    assert argv[:5] == ["runuser", "-u", "alice", "--", "sbatch"]
    assert {"--nodelist=node5", "--gres=none", "--partition=infer", "--comment=hpcserve:unstage:llm-unstage",
            "--output=/srv/replicas/alice/llm/unstage-%j.out"} <= set(argv)  # fmt: skip
    assert script == cleanup_script("/venv/bin/python", ["/local/node5/models/tiny"])
    assert recorded(store, "llm") == {"node6": ["/local/node6/models/tiny"]}  # kept, with its owner
    runner.fail = []
    restarted = Unstager(store, Launcher(runner))  # type: ignore[arg-type]
    restarted.begin(store.list_deployments())  # a restarted service still knows whom to run it as
    restarted.tidy_gone(Planner())  # type: ignore[arg-type]
    assert runner.calls[-1][0][:3] == ["runuser", "-u", "alice"] and "--nodelist=node6" in runner.calls[-1][0]
    assert store.get_state(f"{STATE_PREFIX}llm") is None and restarted.gone == set()
    restarted.begin(store.list_deployments())
    restarted.tidy_gone(Planner())  # type: ignore[arg-type]
    assert len(runner.calls) == 3  # nothing left


def test_rm_leaves_a_copy_a_live_deployment_uses_but_not_one_an_off_deployment_staged(
    store: HistoryStore,
) -> None:
    for name in ("one", "two", "three"):
        serve(store, name)  # the same model in the same warm tier
    runner = Runner()
    unstager = Unstager(store, Launcher(runner))  # type: ignore[arg-type]
    unstager.begin(store.list_deployments())
    ready(store, "two", 0, "node5")
    ready(store, "three", 0, "node6")
    for name in ("two", "three"):
        unstager.note(store.get_deployment(name), store.replicas(name), {}, None)  # type: ignore[arg-type]
    store.set_tier("three", "off", NOW)  # off: it needs nothing staged
    staged_and_removed(store, unstager, "one", "node5", "node6")
    unstager.begin(store.list_deployments())
    unstager.tidy_gone(Planner())  # type: ignore[arg-type]
    ((argv, script),) = runner.calls
    assert "--nodelist=node6" in argv and str(script).endswith(" /local/node6/models/tiny\n")
    assert store.get_state(f"{STATE_PREFIX}one") is None
    assert recorded(store, "two") == {"node5": ["/local/node5/models/tiny"]}


def test_a_pool_removed_with_its_last_member_removes_its_members_copies(store: HistoryStore) -> None:
    shape = {"engine": "simulator", "warm_tier": WARM}

    def spec_of(pool: str, members: list[dict[str, Any]]) -> dict[str, Any]:
        return {"kind": "pool", "name": pool, "max_awake": 1, "partition": "infer"}

    store.join_pool("a", "alice", {"name": "a", "model": "/cold/a", "pool": "p", **shape}, "p", spec_of)
    store.upsert_replica(
        "p", 0, job_id="100", state="ready", host="node5", port=9000, url="http://node5:9000"
    )
    runner = Runner()
    unstager = Unstager(store, Launcher(runner))  # type: ignore[arg-type]
    unstager.begin(store.list_deployments())
    members = [dict(d.spec) for d in store.list_deployments() if d.name == "a"]
    unstager.note(store.get_deployment("p"), store.replicas("p"), {}, members)  # type: ignore[arg-type]
    assert store.leave_pool("a", "p", spec_of, user="alice") is True  # the member's row: no replicas
    assert store.get_deployment("p").deleted  # type: ignore[union-attr]  # its job stops first
    store.remove_replica("p", 0)
    unstager.begin(store.list_deployments())
    unstager.tidy_gone(Planner())  # type: ignore[arg-type]
    ((argv, script),) = runner.calls
    assert argv[:3] == ["runuser", "-u", "alice"]
    assert {"--nodelist=node5", "--partition=infer", "--output=/srv/replicas/alice/p/unstage-%j.out",
            "--comment=hpcserve:unstage:p-unstage"} <= set(argv)  # fmt: skip
    assert str(script).endswith(" /local/node5/models/a\n") and store.get_state(f"{STATE_PREFIX}p") is None


def test_a_name_another_user_took_before_the_cleanup_runs_it_as_the_first_owner(store: HistoryStore) -> None:
    serve(store, "llm")
    runner = Runner(fail=["node5"])
    unstager = Unstager(store, Launcher(runner))  # type: ignore[arg-type]
    staged_and_removed(store, unstager, "llm", "node5")
    unstager.begin(store.list_deployments())
    unstager.tidy_gone(Planner())  # type: ignore[arg-type]  # fails: kept
    bobs = store.create_deployment("llm", "bob", {"name": "llm", "model": "/cold/other", "warm_tier": WARM,
                                                  "engine": "simulator"}, 1)  # fmt: skip
    store.upsert_replica("llm", 0, job_id="200", state="ready", host="node7", port=8000, url="http://node7:8000",
                         phases={"staging": {"kind": "copied"}})  # fmt: skip
    runner.fail = []
    unstager.begin(store.list_deployments())
    assert unstager.gone == {"llm"}
    unstager.note(bobs, store.replicas("llm"), {}, None)  # not mixed into alice's leftovers
    unstager.tidy(bobs, Tier.OFF, 1, Planner())  # type: ignore[arg-type]  # bob's deployment leaves it
    assert len(runner.calls) == 1
    unstager.tidy_gone(Planner())  # type: ignore[arg-type]
    assert runner.calls[-1][0][:3] == ["runuser", "-u", "alice"] and "--nodelist=node5" in runner.calls[-1][0]
    unstager.note(bobs, store.replicas("llm"), {}, None)  # now bob's copies are recorded, as his
    assert store.get_state(f"{STATE_PREFIX}llm") == {
        "nodes": {"node7": ["/local/node7/models/other"]},
        "owner": {"user": "bob", "account": None, "partition": None},
    }


def test_the_controller_cleans_up_after_rm_once_the_last_replica_is_gone(store: HistoryStore) -> None:
    from hpcserve.serving.controller import ServingController
    from tests.test_serving_controller import FakeSlurm, job, policy

    serve(store, "llm", partition="infer")
    ready(store, "llm", 0, "node5")
    slurm, runner = FakeSlurm([job(100, "llm", 0)]), Runner()
    ctl = ServingController(store=store, client=slurm, submitter=Planner,  # type: ignore[arg-type]
                            launcher=Launcher(runner), policy=policy(),  # type: ignore[arg-type]
                            ready_timeout_s=60, scrape=lambda url: None, service_user="root",
                            clock=lambda: NOW)  # fmt: skip
    ctl.tick()
    assert recorded(store, "llm") == {"node5": ["/local/node5/models/tiny"]}
    store.delete_deployment("llm", user="alice")
    for _ in range(3):  # drained (nothing in flight), then cancelled
        ctl.tick()
    assert slurm.cancelled == ["100"] and runner.calls == []  # its replica stops first
    slurm.queue.clear()  # the job has ended
    ctl.tick()  # the replica is forgotten, the row goes with it
    assert store.get_deployment("llm") is None
    ctl.tick()
    ((argv, script),) = runner.calls
    assert argv[:3] == ["runuser", "-u", "alice"] and "--nodelist=node5" in argv
    assert str(script).endswith(" /local/node5/models/tiny\n") and recorded(store, "llm") is None


# ---------------------------------------------------------------------------- the job's helper
def test_the_helper_removes_only_folders_hpcserve_staged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cold = tmp_path / "cold" / "tiny"
    cold.mkdir(parents=True)
    (cold / "w.bin").write_bytes(b"x" * 100)
    staged = tmp_path / "warm" / "tiny"
    stage_weights(cold, staged)
    assert (staged / MANIFEST).is_file()
    mine = tmp_path / "warm" / "mine"  # the owner's own folder: no manifest
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    link = tmp_path / "warm" / "link"
    link.symlink_to(staged)
    assert cleanup_main([str(staged), str(tmp_path / "warm" / "absent")]) == 0
    assert not staged.exists() and cold.is_dir()
    stage_weights(cold, staged)
    assert cleanup_main([str(mine), str(link), "relative/path", str(tmp_path / "warm" / ".." / "x")]) == 1
    assert (mine / "notes.txt").read_text() == "keep me" and (staged / MANIFEST).is_file()
    out = capsys.readouterr().out
    assert f"refused {mine}: no {MANIFEST} in it" in out and f"refused {link}: not a folder" in out
    assert cleanup_main([]) == 2


def test_the_helper_runs_as_its_own_program(tmp_path: Path) -> None:
    staged = tmp_path / "tiny"
    staged.mkdir()
    (staged / MANIFEST).write_text("{}")
    done = subprocess.run([sys.executable, "-I", "-m", "hpcserve.serving.warm_cleanup", str(staged)],
                          capture_output=True, text=True, check=False, timeout=60)  # fmt: skip
    assert done.returncode == 0 and f"removed {staged}" in done.stdout and not staged.exists()


def test_a_copy_a_replica_holds_is_kept_until_it_lets_go(tmp_path: Path) -> None:
    cold = tmp_path / "cold" / "tiny"
    cold.mkdir(parents=True)
    (cold / "w.bin").write_bytes(b"x" * 100)
    staged = tmp_path / "warm" / "tiny"
    held = hold_warm_copy(staged)  # a replica on the node: held before it stages, for its life
    stage_weights(cold, staged)
    try:
        assert cleanup_main([str(staged)]) == 1 and (staged / "w.bin").is_file()
        done = subprocess.run([sys.executable, "-I", "-m", "hpcserve.serving.warm_cleanup", str(staged)],
                              capture_output=True, text=True, check=False, timeout=60)  # fmt: skip
        assert done.returncode == 1 and f"kept {staged}: a replica on this node" in done.stdout
    finally:
        os.close(held)  # the replica ended
    assert cleanup_main([str(staged)]) == 0 and not staged.exists()
    assert lock_path(staged).is_file()  # the lock stays beside the removed copy: no race on its inode
