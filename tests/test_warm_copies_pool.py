"""A member that leaves a live pool: its warm copies are removed as the owner once every replica of the pool
runs the members of now (``warm_copies.plan_left``, ``Unstager.tidy_left``, ``PoolLoad.settled``); the
copies the members of now stage, and copies another live deployment staged, stay. The removal of a whole
pool's copies (off, or removed with its last member) is in test_warm_copies.py."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hpcserve.serving.residency import PoolLoad
from hpcserve.serving.spec import DeploymentSpec
from hpcserve.serving.unstage import STATE_PREFIX, Unstager
from hpcserve.serving.warm_copies import Staged, plan_left
from hpcserve.store import Deployment, HistoryStore
from tests.test_warm_copies import WARM, Launcher, Planner, Runner, recorded, serve, store

__all__ = ["store"]  # the fixture, used by name
SHAPE = {"engine": "simulator", "warm_tier": WARM}


def test_left_copies_are_those_no_member_stages_now_less_those_another_deployment_needs() -> None:
    staged = Staged().with_seen([("node5", "/l/5/a"), ("node5", "/l/5/b"), ("node6", "/l/6/b")])
    kept = frozenset({("node5", "/l/5/a")})
    assert plan_left(staged, kept, frozenset()).remove == {"node5": ("/l/5/b",), "node6": ("/l/6/b",)}
    shared = plan_left(staged, kept, frozenset({("node6", "/l/6/b")}))
    assert shared.remove == {"node5": ("/l/5/b",)} and shared.shared == {("node6", "/l/6/b")}
    everyone = frozenset(staged.pairs())
    assert plan_left(staged, everyone, frozenset()).remove == {}  # nobody left


def spec_of(pool: str, members: list[dict[str, Any]]) -> dict[str, Any]:
    return {"kind": "pool", "name": pool, "max_awake": 1, "partition": "infer"}


def join(store: HistoryStore, name: str) -> None:
    store.join_pool(
        name, "alice", {"name": name, "model": f"/cold/{name}", "pool": "p", **SHAPE}, "p", spec_of
    )


def pool_replica(store: HistoryStore, index: int, models: list[str], state: str = "ready") -> None:
    ports = {m: 9001 + i for i, m in enumerate(models)}
    store.upsert_replica("p", index, job_id=str(100 + index), state=state, host="node5", port=9000,
                         url="http://node5:9000", models=ports)  # fmt: skip


def test_a_member_that_left_has_its_copy_removed_once_no_replica_serves_it(store: HistoryStore) -> None:
    for name in ("a", "b"):
        join(store, name)
    serve(store, "other", model="/cold/c")  # a live deployment that staged what pool member c did
    pool_replica(store, 0, ["a", "b", "c"])
    runner = Runner()
    unstager = Unstager(store, Launcher(runner))  # type: ignore[arg-type]
    listed = store.list_deployments()
    unstager.begin(listed)
    members = [{"name": m, "model": f"/cold/{m}", "pool": "p", **SHAPE} for m in ("a", "b", "c")]
    unstager.note(store.get_deployment("p"), store.replicas("p"), {}, members)  # type: ignore[arg-type]
    store.upsert_replica("other", 0, job_id="200", state="ready", host="node5", port=8000,
                         url="http://node5:8000")  # fmt: skip
    unstager.note(store.get_deployment("other"), store.replicas("other"), {}, None)  # type: ignore[arg-type]
    assert recorded(store, "p") == {"node5": ["/local/node5/models/a", "/local/node5/models/b",
                                              "/local/node5/models/c"]}  # fmt: skip

    assert store.leave_pool("b", "p", spec_of, user="alice") is True  # b leaves; the pool lives on with a
    pool = store.get_deployment("p")
    assert pool is not None and not pool.deleted
    load = PoolLoad({"p": [d for d in store.list_deployments() if d.name == "a"]})
    assert not load.settled(pool, store.replicas("p"))  # replica 0 still runs b (and c): hand over first
    pool_replica(store, 1, ["a"], state="starting")
    assert not load.settled(pool, store.replicas("p"))  # the new one is not ready yet
    pool_replica(store, 1, ["a"])
    store.remove_replica("p", 0)
    assert load.settled(pool, store.replicas("p"))

    unstager.begin(store.list_deployments())
    unstager.tidy_left(pool, load.specs(pool) or [], Planner())  # type: ignore[arg-type]
    ((argv, script),) = runner.calls
    assert argv[:3] == ["runuser", "-u", "alice"] and "--nodelist=node5" in argv
    assert str(script).endswith(" /local/node5/models/b\n")  # c: "other" still uses it; a: the pool's
    assert recorded(store, "p") == {"node5": ["/local/node5/models/a"]}
    unstager.tidy_left(pool, load.specs(pool) or [], Planner())  # type: ignore[arg-type]
    assert len(runner.calls) == 1  # nothing more to remove
    assert store.get_state(f"{STATE_PREFIX}other") is not None


def test_only_a_live_pool_is_ever_settled(store: HistoryStore) -> None:
    join(store, "a")
    serve(store, "llm")
    pool, llm = store.get_deployment("p"), store.get_deployment("llm")
    assert pool is not None and llm is not None
    load = PoolLoad({"p": [d for d in store.list_deployments() if d.name == "a"]})
    assert load.settled(pool, [])  # no replica: none serves a member that left
    assert not load.settled(llm, [])  # not a pool: nothing to hand over
    pool_replica(store, 0, ["a"])
    assert load.settled(pool, store.replicas("p"))
    assert store.leave_pool("a", "p", spec_of, user="alice") is True  # the last member: the pool goes
    gone = store.get_deployment("p")  # once its replica stops (``tidy_gone`` then removes its copies)
    assert gone is not None and gone.deleted and not load.settled(gone, store.replicas("p"))


class Looking(Unstager):
    """Counts how often the member specs are checked (and the cold tier looked at for them)."""

    looked = 0

    def _specs(
        self, deployment: Deployment, members: Sequence[Mapping[str, Any]] | None
    ) -> list[DeploymentSpec]:
        self.looked += 1
        return super()._specs(deployment, members)


def test_a_failed_submit_is_tried_again_and_a_tidy_pool_is_not_looked_at_again(store: HistoryStore) -> None:
    for name in ("a", "b"):
        join(store, name)
    pool_replica(store, 0, ["a", "b"])
    runner = Runner(fail=["node5"])
    unstager = Looking(store, Launcher(runner))  # type: ignore[arg-type]
    unstager.begin(store.list_deployments())
    members = [{"name": m, "model": f"/cold/{m}", "pool": "p", **SHAPE} for m in ("a", "b")]
    unstager.note(store.get_deployment("p"), store.replicas("p"), {}, members)  # type: ignore[arg-type]
    store.leave_pool("b", "p", spec_of, user="alice")
    store.remove_replica("p", 0)  # handed over: no replica runs b
    pool = store.get_deployment("p")
    assert pool is not None
    for _ in range(2):
        unstager.tidy_left(pool, members[:1], Planner())  # type: ignore[arg-type]
    assert len(runner.calls) == 2 and recorded(store, "p") == {
        "node5": ["/local/node5/models/a", "/local/node5/models/b"]
    }
    runner.fail = []
    unstager.tidy_left(pool, members[:1], Planner())  # type: ignore[arg-type]
    assert len(runner.calls) == 3 and recorded(store, "p") == {"node5": ["/local/node5/models/a"]}
    unstager.looked = 0
    for _ in range(3):  # tidy now: neither the specs nor the cold tier are looked at again
        unstager.tidy_left(pool, members[:1], Planner())  # type: ignore[arg-type]
    assert unstager.looked == 0 and len(runner.calls) == 3
    members.append({"name": "c", "model": "/cold/c", "pool": "p", **SHAPE})  # another joins: looked at again
    unstager.tidy_left(pool, [members[0], members[2]], Planner())  # type: ignore[arg-type]
    assert unstager.looked == 1 and len(runner.calls) == 3


def test_a_deployment_whose_replicas_did_not_change_is_not_looked_at_again(store: HistoryStore) -> None:
    llm = serve(store, "llm")
    unstager = Looking(store, Launcher(Runner()))  # type: ignore[arg-type]
    unstager.begin([llm])
    store.upsert_replica("llm", 0, job_id="100", state="ready", host="node5", port=8000,
                         url="http://node5:8000")  # fmt: skip
    for _ in range(3):  # each tick: the same ready replica, nothing new to record
        unstager.note(llm, store.replicas("llm"), {}, None)
    assert unstager.looked == 1 and recorded(store, "llm") == {"node5": ["/local/node5/models/tiny"]}
    store.upsert_replica("llm", 1, job_id="101", state="ready", host="node6", port=8000,
                         url="http://node6:8000")  # fmt: skip
    unstager.note(llm, store.replicas("llm"), {}, None)  # a new replica: looked at, recorded
    assert unstager.looked == 2 and set(recorded(store, "llm") or {}) == {"node5", "node6"}
    unstager.note(llm, store.replicas("llm"), {}, None)
    assert unstager.looked == 2
