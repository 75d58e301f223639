"""A model pool on the real cluster: alice puts three engine-simulator deployments in one pool (at most
two awake), the service runs ONE replica job for the pool, as alice, with one engine per member behind
the replica agent. The replica announces the agent and its engines; the agent answers only with the
engine key; waking the models in turn puts the least recently used one to sleep, and no more than two
engines are ever awake (every engine's /is_sleeping polled all along); each engine, once woken, answers."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from hpcserve.serving.launcher import lookup_owner
from hpcserve.store import Replica
from tests.api_fixtures import ApiService, cancel_replicas
from tests.conftest import wait_until
from tests.test_replicas_as_owner import call_as, engine_pid

pytestmark = pytest.mark.cluster
MEMBERS = ("a", "b", "c")
MAX_AWAKE = 2


@dataclass
class Pool:
    service: ApiService
    name: str
    members: dict[str, str]  # member letter -> served model name
    replica: Replica

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.replica.engine_key}"}

    def engine_url(self, served: str) -> str:
        assert self.replica.models is not None
        return f"http://{self.replica.host}:{self.replica.models[served]}"

    def sleeping(self) -> dict[str, bool]:
        """Each engine's own /is_sleeping (answered only in vLLM's dev-server mode)."""
        answers = {}
        for served in self.members.values():
            response = httpx.get(f"{self.engine_url(served)}/is_sleeping", timeout=10)
            answers[served] = bool(response.json()["is_sleeping"])
        return answers

    def wake(self, served: str) -> dict[str, object]:
        url = f"{self.replica.url}/hpcserve/wake"
        response = httpx.post(url, params={"model": served}, headers=self.auth, timeout=60)
        assert response.status_code == 200, response.text
        return dict(response.json())


@pytest.fixture(scope="module")
def pool(slurm_env: dict[str, str]) -> Iterator[Pool]:
    root = Path(tempfile.mkdtemp(prefix="hps-", dir="/tmp"))
    root.chmod(0o755)
    service = ApiService(root, slurm_env, f"sqlite:///{root / 'state' / 'hpcserve.db'}")
    site = yaml.safe_load(service.site.read_text())
    site["serving"] |= {"replica_dir": str(root / "replicas"), "controller_interval_s": 0.5,
                        "ready_timeout_s": 180}  # fmt: skip
    service.site.write_text(yaml.safe_dump(site))
    service.start("--sample-interval", "0", "--rebalance-interval", "0")
    tag = uuid.uuid4().hex[:6]
    name, members = f"pool-{tag}", {m: f"{m}-{tag}" for m in MEMBERS}
    try:
        service.wait_ready()
        for i, served in enumerate(members.values()):  # the pool starts its replica once the last joins
            values = {"name": served, "model": f"sim/{served}-1B", "engine": "simulator",
                      "gpus_per_replica": 1, "min_replicas": int(i == len(members) - 1), "max_replicas": 1,
                      "pool": name, "pool_max_awake": MAX_AWAKE}  # fmt: skip
            created = call_as(service, "alice", "POST", "/v1/deployments", {"values": values})
            assert created.get("owner") == "alice", created

        def ready() -> list[Replica]:
            with service.store() as store:
                return [r for r in store.replicas(name) if r.state == "ready" and r.models]

        wait_until(lambda: bool(ready()), timeout=240, interval=0.5)
        yield Pool(service, name, members, ready()[0])
    finally:
        service.stop()
        cancel_replicas(service)
        shutil.rmtree(root, ignore_errors=True)


def test_one_job_serves_every_member_behind_its_agent(pool: Pool) -> None:
    with pool.service.store() as store:
        replicas = store.replicas(pool.name)
        assert [m for m in pool.members.values() if store.replicas(m)] == []  # members have no jobs
    assert len(replicas) == 1
    assert pool.replica.models is not None and set(pool.replica.models) == set(pool.members.values())
    assert pool.replica.port not in pool.replica.models.values()
    assert pool.replica.phases is not None and pool.replica.phases["engine_load_s"] > 0  # the first engine's
    assert httpx.get(f"{pool.replica.url}/hpcserve/engines", timeout=10).status_code == 401
    listed = httpx.get(f"{pool.replica.url}/hpcserve/engines", headers=pool.auth, timeout=10).json()
    assert listed["max_awake"] == MAX_AWAKE
    assert {n: e["port"] for n, e in listed["engines"].items()} == pool.replica.models
    assert sum(not asleep for asleep in pool.sleeping().values()) <= MAX_AWAKE


def test_each_engine_runs_as_alice_in_sleep_mode(pool: Pool) -> None:
    assert pool.replica.models is not None
    alice = str(lookup_owner("alice").uid)
    for port in pool.replica.models.values():
        proc = Path("/proc") / str(engine_pid(port))
        argv = (proc / "cmdline").read_bytes().split(b"\0")
        assert b"--enable-sleep-mode" in argv
        assert argv[argv.index(b"--gpu-memory-utilization") + 1] == b"0.45"  # 0.9 / MAX_AWAKE
        assert b"VLLM_SERVER_DEV_MODE=1" in (proc / "environ").read_bytes().split(b"\0")
        uids = next(line.split()[1:] for line in (proc / "status").read_text().splitlines()
                    if line.startswith("Uid:"))  # fmt: skip
        assert uids == [alice] * 4


def test_waking_in_turn_sleeps_the_lru_model_and_never_exceeds_max_awake(pool: Pool) -> None:
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(sum(not asleep for asleep in pool.sleeping().values()))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    a, b, c = (pool.members[m] for m in MEMBERS)
    try:
        order = [a, b, c, a, b, c]
        for i, served in enumerate(order):
            answer = pool.wake(served)
            assert answer["model"] == served
            if i >= MAX_AWAKE:  # the model woken MAX_AWAKE wakes ago is the least recently used
                assert answer["woke"] and answer["slept"] == order[i - MAX_AWAKE], (i, answer)
            assert not pool.sleeping()[served]
            body = {"model": served, "prompt": "hi", "max_tokens": 2}
            done = httpx.post(f"{pool.engine_url(served)}/v1/completions", json=body, headers=pool.auth,
                              timeout=30)  # fmt: skip
            assert done.status_code == 200, done.text
    finally:
        stop.set()
        watcher.join(timeout=30)
    assert seen and max(seen) <= MAX_AWAKE
    slept = httpx.post(f"{pool.replica.url}/hpcserve/sleep", params={"model": "all"}, headers=pool.auth,
                       timeout=60)  # fmt: skip
    assert slept.status_code == 200 and all(pool.sleeping().values())


def test_scancel_stops_every_engine(pool: Pool) -> None:
    assert pool.replica.models is not None and pool.replica.job_id
    ports = list(pool.replica.models.values())
    pids = [engine_pid(port) for port in ports]
    subprocess.run(["scancel", pool.replica.job_id], check=True, timeout=30)
    wait_until(lambda: not any(Path("/proc", str(pid)).exists() for pid in pids), timeout=90, interval=0.5)
