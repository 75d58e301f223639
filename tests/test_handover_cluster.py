"""A replica outlives its time limit without dropping a request, on the real cluster.

alice serves ``handover-llm`` (engine simulator, one replica, a 3-minute time limit); ``hpcserve service``
(as root, controller every 0.5 s, ``serving.renew_before_s`` 90) and ``hpcserve gateway`` run as at a site.
Four clients stream requests through the gateway without pause. Before the limit, the service starts a
successor, drains the old replica once the successor is ready, and cancels it when nothing is in flight:
every request succeeds, and the old job ends CANCELLED by the service, not TIMEOUT by Slurm.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from hpcserve.slurm.cli_backend import CliSlurmClient
from hpcserve.store import Replica
from tests.api_fixtures import ApiService, free_port
from tests.conftest import wait_until
from tests.service_fixtures import terminate
from tests.test_replicas_as_owner import call_as

pytestmark = pytest.mark.cluster

NAME = "handover-llm"
CLIENTS = 4


@dataclass
class Load:
    """Clients streaming through the gateway until stopped; every outcome kept."""

    url: str
    key: str
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        body = {"model": NAME, "stream": True, "max_tokens": 40,
                "messages": [{"role": "user", "content": "steady"}]}  # fmt: skip
        headers = {"Authorization": f"Bearer {self.key}"}
        while not self.stop.is_set():
            try:
                with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, headers=headers,
                                  timeout=60) as answer:  # fmt: skip
                    text = "".join(answer.iter_text())
                if answer.status_code != 200 or "data: [DONE]" not in text or '"error"' in text:
                    self.failures.append(f"{answer.status_code}: {text[-300:]}")
                else:
                    self.ok += 1
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))


@dataclass
class Rig:
    service: ApiService
    load: Load

    def replicas(self) -> dict[int, Replica]:
        with self.service.store() as store:
            return {r.index: r for r in store.replicas(NAME)}


@pytest.fixture
def rig(slurm_env: dict[str, str]) -> Iterator[Rig]:
    root = Path(tempfile.mkdtemp(prefix="hps-", dir="/tmp"))
    root.chmod(0o755)
    service = ApiService(root, slurm_env, f"sqlite:///{root / 'state' / 'hpcserve.db'}")
    site = yaml.safe_load(service.site.read_text())
    site["serving"] |= {"replica_dir": str(root / "replicas"), "controller_interval_s": 0.5,
                        "ready_timeout_s": 60, "renew_before_s": 90}  # fmt: skip
    service.site.write_text(yaml.safe_dump(site))
    service.start("--sample-interval", "0", "--rebalance-interval", "0")
    gateway: subprocess.Popen[bytes] | None = None
    try:
        service.wait_ready()
        spec = {"name": NAME, "model": "sim-model", "engine": "simulator", "gpus_per_replica": 1,
                "min_replicas": 1, "max_replicas": 1, "time_limit": "00:03:00",
                "simulator": {"decode_ms_per_token": 10}}  # fmt: skip
        created = call_as(service, "alice", "POST", "/v1/deployments", {"values": spec})
        assert created.get("owner") == "alice", created
        made = service.run_as("alice", "keys", "create", "--name", "steady", "--json")
        assert made.returncode == 0, made.stderr
        port = free_port()
        argv = [sys.executable, "-m", "hpcserve", "gateway", "--host", "127.0.0.1", "--port", str(port),
                "--metrics-listen", "off"]  # fmt: skip
        with (root / "gateway.log").open("wb") as out:
            gateway = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=service.env)
        rig = Rig(service, Load(f"http://127.0.0.1:{port}", json.loads(made.stdout)["key"]))
        wait_until(lambda: (r := rig.replicas().get(0)) is not None and r.state == "ready", timeout=90)
        yield rig
    finally:
        if gateway is not None:
            terminate([gateway])
        service.stop()
        leftovers = [j.id for j in CliSlurmClient().jobs() if j.tag and NAME in j.tag]
        if leftovers:
            subprocess.run(["scancel", *leftovers], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


def _warm(load: Load) -> None:
    wait_until(lambda: load.ok > 0 or bool(load.failures), timeout=30)


def test_a_replica_is_replaced_before_its_time_limit_with_no_failed_request(
    rig: Rig, slurm: CliSlurmClient
) -> None:
    first = rig.replicas()[0]
    threads = [threading.Thread(target=rig.load.run, daemon=True) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        _warm(rig.load)
        assert not rig.load.failures, rig.load.failures[:3]  # the gateway found the replica
        gone = lambda: str(first.job_id) not in {j.id for j in slurm.jobs()}  # noqa: E731
        wait_until(gone, timeout=200, interval=1)  # the old job ended: drained and cancelled
        successor = next(r for i, r in rig.replicas().items() if i != 0)
        assert successor.state == "ready"
        time.sleep(3)  # requests keep flowing to the successor
    finally:
        rig.load.stop.set()
        for thread in threads:
            thread.join(timeout=90)
    assert rig.load.failures == [], rig.load.failures[:5]
    assert rig.load.ok > 20
    wait_until(lambda: bool(slurm.accounting([str(first.job_id)])), timeout=30)
    [record] = slurm.accounting([str(first.job_id)])
    assert record.state.value.startswith("CANCELLED"), record  # the service ended it, not the time limit
    assert record.elapsed_s < 180, record


def test_drain_node_moves_a_replica_off_its_node_with_no_failed_request(
    rig: Rig, slurm: CliSlurmClient
) -> None:
    first = rig.replicas()[0]
    [node] = next(j for j in slurm.jobs() if j.id == str(first.job_id)).nodes
    refused = rig.service.run_as("bob", "drain-node", node)
    assert refused.returncode == 77 and "for admins" in refused.stderr, refused.stderr  # bob: no admin
    threads = [threading.Thread(target=rig.load.run, daemon=True) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        _warm(rig.load)
        drained = rig.service.run_as("carol", "drain-node", node, "--reason", "new DIMMs", "--json")
        assert drained.returncode == 0, drained.stderr
        answer = json.loads(drained.stdout)
        assert answer["moving"] == [{"deployment": NAME, "replica": 0, "job_id": first.job_id}], answer
        gone = lambda: str(first.job_id) not in {j.id for j in slurm.jobs()}  # noqa: E731
        wait_until(gone, timeout=120, interval=1)
        successor = next(r for i, r in rig.replicas().items() if i != 0)
        assert successor.state == "ready"
        assert node not in next(j for j in slurm.jobs() if j.id == str(successor.job_id)).nodes
        time.sleep(3)
    finally:
        rig.load.stop.set()
        for thread in threads:
            thread.join(timeout=90)
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], check=False)
    assert rig.load.failures == [], rig.load.failures[:5]
    assert rig.load.ok > 20
    wait_until(lambda: bool(slurm.accounting([str(first.job_id)])), timeout=30)
    [record] = slurm.accounting([str(first.job_id)])
    assert record.state.value.startswith("CANCELLED"), record
    assert record.elapsed_s < 90, record  # moved for the drain, before its time-limit handover was due
