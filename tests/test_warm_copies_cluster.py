"""The off tier on the real cluster: nothing stays staged. alice serves the engine simulator from the site's
cold tier with a node-local warm tier (the site's storage section), a short ``idle_to_zero_s`` and
``off_after_s``. A request through the gateway starts her replica, which stages ("copied") on its node;
idle, the deployment goes cold (no job, the copy kept) and then off: the service submits a small job AS
ALICE on that node (sacct: User=alice) that removes the warm copy, and only that folder. A later request
starts a replica that stages again ("copied"). ``hpcserve rm`` of a deployment whose replica staged removes
its warm copy the same way, once the replica has stopped and the deployment's row is gone. A member that
leaves a live pool has its copy removed the same way once the pool's replicas all run the members left;
their copies stay."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from hpcserve.serving.gateway.keys import hash_key
from hpcserve.serving.phases import StartPhases
from hpcserve.serving.staging import MANIFEST
from hpcserve.serving.unstage import CLEANUP_KIND, STATE_PREFIX
from hpcserve.slurm.cli_backend import CliSlurmClient
from hpcserve.store import HistoryStore, Replica
from tests.conftest import PREFIX, wait_until, write_weights
from tests.test_serving_cluster import KEY, Serving, _up, chat

pytestmark = pytest.mark.cluster
MODEL = "tiny-weights"  # a folder of the cold tier, named relative: the site's cold tier resolves it
OTHER = "other-weights"  # another one, for a second pool member
FILES = {"config.json": 64, "model.safetensors": 4 << 20}
IDLE_TO_ZERO_S, OFF_AFTER_S = 4, 20


class Rig(Serving):
    """The gateway (alice's key) and the service, with the site's cold and warm tiers of this test."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.cold, self.warm = root / "cold", root / "warm"
        site = yaml.safe_load((root / "site.yaml").read_text())
        site["storage"] = {"cold": {"path": str(self.cold)}, "warm": {"path": f"{self.warm}/{{node}}"}}
        (root / "site.yaml").write_text(yaml.safe_dump(site))
        keys = {"keys": [{"id": "alice", "owner": "alice", "sha256": hash_key(KEY)}]}
        (root / "keys.yaml").write_text(yaml.safe_dump(keys))

    def as_alice(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in self.env.items() if not k.startswith("HPCSERVE_DATABASE")}
        return subprocess.run(["runuser", "-u", "alice", "--", sys.executable, "-m", "hpcserve", *args],
                              capture_output=True, text=True, env=env, timeout=120, check=False,
                              cwd="/")  # fmt: skip

    def replicas(self, name: str) -> list[Replica]:
        with HistoryStore(self.env["HPCSERVE_DATABASE_URL"]) as store:
            return store.replicas(name)

    def tier(self, name: str) -> str | None:
        with HistoryStore(self.env["HPCSERVE_DATABASE_URL"]) as store:
            deployment = store.get_deployment(name)
        return None if deployment is None else deployment.tier

    def recorded(self, name: str) -> dict[str, object] | None:
        """The warm copies the service keeps for ``name`` (service state ``staged:<name>``)."""
        with HistoryStore(self.env["HPCSERVE_DATABASE_URL"]) as store:
            return store.get_state(f"{STATE_PREFIX}{name}")

    def recorded_on(self, name: str, node: str) -> list[str]:
        """The warm copies on ``node`` the service keeps for ``name``."""
        nodes = (self.recorded(name) or {}).get("nodes")
        return list(nodes.get(node, [])) if isinstance(nodes, dict) else []

    def ready(self, name: str, after: str | None = None, models: set[str] | None = None) -> Replica:
        """A ready replica of ``name`` with its phases (not job ``after``; running ``models``, a pool's)."""
        found: list[Replica] = []

        def ready() -> bool:
            found[:] = [r for r in self.replicas(name)
                        if r.state == "ready" and r.job_id != after and r.phases
                        and (models is None or set(r.models or ()) == models)]  # fmt: skip
            return bool(found)

        wait_until(ready, timeout=120, interval=0.5)
        return found[0]


@pytest.fixture
def rig(slurm: CliSlurmClient) -> Iterator[Rig]:
    root = PREFIX / "jobs" / f"unstage-{uuid.uuid4().hex[:8]}"  # every node and every user can reach it
    root.mkdir(parents=True)
    root.chmod(0o755)
    rig = Rig(root)
    write_weights(rig.cold / MODEL, FILES)
    rig.warm.mkdir()
    rig.warm.chmod(0o1777)  # alice's replicas make their node's folder in it
    assert rig.cli("db", "upgrade").returncode == 0
    keys = str(root / "keys.yaml")
    rig.start(
        "gateway", "--port", str(rig.port), "--keys", keys, "--metrics-listen", "off", log="gateway.log"
    )
    rig.start("service", "--rebalance-interval", "0", "--metrics-port", "0", log="service.log")
    wait_until(lambda: _up(rig.url("/health")) and rig.socket.exists(), timeout=30)
    yield rig
    rig.stop()
    leftovers = [j.id for j in slurm.jobs() if j.tag and any(name in j.tag for name in rig.names)]
    if leftovers:
        slurm.cancel(leftovers)
    shutil.rmtree(root, ignore_errors=True)


def first_answer(rig: Rig, name: str) -> httpx.Response:
    """A chat answer, asked again while the gateway has not read the new deployment's route (404)."""
    answers: list[httpx.Response] = []

    def answered() -> bool:
        answers.append(chat(rig, name, timeout=180))
        return answers[-1].status_code != 404

    wait_until(answered, timeout=15, interval=0.5)
    return answers[-1]


def cleanup_job(rig: Rig, slurm: CliSlurmClient, name: str, node: str, warm: Path) -> None:
    """The one cleanup job's log says it removed ``warm``; sacct: it ran as alice on ``node``, exit 0."""
    folder = rig.root / "replicas" / "alice" / name
    (log,) = folder.glob("unstage-*.out")
    job_id = log.name.removeprefix("unstage-").removesuffix(".out")
    assert f"removed {warm}" in log.read_text()
    # slurmdbd first stores the job as "allocation", and its name with the job's end record
    cleanup_name = f"{name}-{CLEANUP_KIND}"
    wait_until(lambda: [r.name for r in slurm.accounting([job_id])] == [cleanup_name], timeout=30)
    (record,) = slurm.accounting([job_id])
    assert (record.user, record.nodes, record.exit_code) == ("alice", (node,), "0:0"), record


def staged_by_alice(rig: Rig, name: str, *flags: str) -> tuple[Replica, str, Path, Path]:
    """alice serves ``name`` from zero; its first replica copies the weights to its node's warm tier. The
    replica, its node, the warm copy, and a folder of alice's beside it that hpcserve did not stage."""
    out = rig.as_alice("serve", MODEL, "--name", name, "--engine", "simulator", "--gpus-per-replica", "1",
                       "--min-replicas", "0", "--max-replicas", "1", *flags)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert first_answer(rig, name).status_code == 200  # from zero: starts alice's replica
    replica = rig.ready(name)
    assert StartPhases.from_json(replica.phases).staging.kind == "copied"
    node = str(replica.host)
    warm = rig.warm / node / MODEL
    assert (warm / MANIFEST).is_file() and warm.stat().st_uid != 0  # alice's copy
    keep = rig.warm / node / "alices-own"
    keep.mkdir()
    return replica, node, warm, keep


def test_off_removes_the_warm_copy_as_the_owner_and_a_later_start_copies_again(
    rig: Rig, slurm: CliSlurmClient
) -> None:
    name = rig.name("unstage")
    replica, node, warm, keep = staged_by_alice(
        rig, name, "--idle-to-zero", str(IDLE_TO_ZERO_S), "--off-after", str(OFF_AFTER_S)
    )

    seen: list[str | None] = []

    def off() -> bool:
        tier = rig.tier(name)
        if not seen or seen[-1] != tier:
            seen.append(tier)
        return tier == "off"

    wait_until(off, timeout=IDLE_TO_ZERO_S + OFF_AFTER_S + 60, interval=0.5)
    assert "cold" in seen and rig.replicas(name) == [], seen  # cold first: no job, the copy kept
    wait_until(lambda: not warm.exists(), timeout=60, interval=0.5)
    assert keep.is_dir()
    cleanup_job(rig, slurm, name, node, warm)

    started = time.monotonic()
    assert first_answer(rig, name).status_code == 200  # off -> hot: a new replica stages again
    again = rig.ready(name, after=replica.job_id)
    phases = StartPhases.from_json(again.phases)
    print(f"after off: {phases.summary()} ({time.monotonic() - started:.1f}s to the answer)")
    assert phases.staging.kind == "copied" and rig.tier(name) == "hot"


def test_rm_removes_the_warm_copy_as_the_owner_once_the_replica_is_gone(
    rig: Rig, slurm: CliSlurmClient
) -> None:
    name = rig.name("rmwarm")
    _, node, warm, keep = staged_by_alice(rig, name)
    wait_until(lambda: rig.recorded(name) is not None, timeout=30, interval=0.5)  # the service noted it

    started = time.monotonic()
    out = rig.as_alice("rm", name)
    assert out.returncode == 0, out.stderr
    wait_until(lambda: not warm.exists(), timeout=120, interval=0.5)
    print(f"rm -> warm copy gone in {time.monotonic() - started:.1f}s")
    assert keep.is_dir() and rig.tier(name) is None  # the row went with its replica
    assert not [j for j in slurm.jobs() if j.tag and name in j.tag and CLEANUP_KIND not in j.tag]
    cleanup_job(rig, slurm, name, node, warm)
    wait_until(lambda: rig.recorded(name) is None, timeout=10, interval=0.5)  # the record went with it


def test_a_member_leaving_a_live_pool_has_its_copy_removed_and_the_others_stay(
    rig: Rig, slurm: CliSlurmClient
) -> None:
    write_weights(rig.cold / OTHER, FILES)
    pool, stays, leaves = rig.name("wpool"), rig.name("stays"), rig.name("leaves")
    for name, model in ((stays, MODEL), (leaves, OTHER)):
        out = rig.as_alice("serve", model, "--name", name, "--engine", "simulator", "--gpus-per-replica",
                           "1", "--min-replicas", "1", "--max-replicas", "1", "--pool", pool)  # fmt: skip
        assert out.returncode == 0, out.stderr
    assert first_answer(rig, stays).status_code == 200
    replica = rig.ready(pool, models={stays, leaves})  # (a replica started before the second joined: stale)
    node = str(replica.host)
    kept, removed = rig.warm / node / MODEL, rig.warm / node / OTHER
    assert (kept / MANIFEST).is_file() and (removed / MANIFEST).is_file()  # each member's engine staged
    first = StartPhases.from_json(replica.phases).staging  # the members' stagings added (one may have been
    assert first.kind == "copied" and first.bytes >= sum(FILES.values()), first  # staged by a stale one)
    wait_until(lambda: len(rig.recorded_on(pool, node)) == 2, timeout=30)

    started = time.monotonic()
    out = rig.as_alice("rm", leaves)
    assert out.returncode == 0, out.stderr
    wait_until(lambda: not removed.exists(), timeout=180, interval=0.5)
    print(f"member rm -> its warm copy gone in {time.monotonic() - started:.1f}s")
    # handed over: the pool's replicas all run the member left (a new one, or the one started before
    # the second member joined, current again)
    wait_until(lambda: {tuple(r.models or ()) for r in rig.replicas(pool) if r.state == "ready"} == {(stays,)}
               and len(rig.replicas(pool)) == 1, timeout=60, interval=0.5)  # fmt: skip
    assert (kept / MANIFEST).is_file()
    cleanup_job(rig, slurm, pool, node, removed)
    assert rig.recorded_on(pool, node) == [str(kept)]
    assert chat(rig, stays, timeout=60).status_code == 200
