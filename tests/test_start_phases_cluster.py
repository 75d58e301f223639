"""A replica's start, measured on the real cluster: the engine simulator's replicas (Slurm jobs on the
inference partition, run by the real service) with weights in the site's cold tier and a node-local warm
tier from the site's storage section.

The first start on a node copies the weights ("copied"); a later start on the same node finds the warm copy
good by its manifest and reads nothing ("warm-valid": no byte hashed). A deployment cannot name a node, so
the replica is restarted (its job cancelled; the service starts another) until a start lands on a node that
staged before; every start on a new node must copy, every start on a node seen before must not hash.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from hpcserve.serving.phases import StartPhases
from hpcserve.serving.staging import MANIFEST, read_manifest
from hpcserve.slurm.cli_backend import CliSlurmClient
from tests.conftest import PREFIX, wait_until, write_weights
from tests.test_serving_cluster import Serving, free_port

pytestmark = pytest.mark.cluster
MODEL = "tiny-weights"  # a folder of the cold tier, named relative: the site's cold tier resolves it
FILES = {"config.json": 64, "model-00001-of-00002.safetensors": 24 << 20,
         "model-00002-of-00002.safetensors": 8 << 20, "tokenizer/tokenizer.json": 20_000}  # fmt: skip
MAX_STARTS = 5  # 4 inference nodes: the 5th start at the latest lands on a node seen before


class Rig(Serving):
    """The service (no gateway: the replica's first token goes to its engine) with its /metrics, and the
    site's storage section pointed at a cold and a warm tier of this test."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.metrics_port = free_port()
        self.cold, self.warm = root / "cold", root / "warm"
        site = yaml.safe_load((root / "site.yaml").read_text())
        site["storage"] = {"cold": {"path": str(self.cold)}, "warm": {"path": f"{self.warm}/{{node}}"}}
        (root / "site.yaml").write_text(yaml.safe_dump(site))

    def metrics(self) -> dict[tuple[str, ...], float]:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        return {(s.labels["deployment"], s.labels["phase"], s.labels["staging"]): s.value
                for family in text_string_to_metric_families(text) for s in family.samples
                if s.name == "hpcserve_replica_start_phase_seconds"}  # fmt: skip


@pytest.fixture
def rig(slurm: CliSlurmClient) -> Iterator[Rig]:
    root = PREFIX / "jobs" / f"phases-{uuid.uuid4().hex[:8]}"  # every node sees it
    root.mkdir(parents=True)
    root.chmod(0o755)
    rig = Rig(root)
    write_weights(rig.cold / MODEL, FILES)
    assert rig.cli("db", "upgrade").returncode == 0
    rig.start(
        "service", "--rebalance-interval", "0", "--metrics-port", str(rig.metrics_port), log="service.log"
    )
    wait_until(rig.socket.exists, timeout=30)
    yield rig
    rig.stop()
    tags = tuple(f"hpcserve:replica:{name}:" for name in rig.names)
    leftovers = [j.id for j in slurm.jobs() if j.tag and j.tag.startswith(tags)]
    if leftovers:
        slurm.cancel(leftovers)
    shutil.rmtree(root, ignore_errors=True)


def next_start(rig: Rig, name: str, after: str | None) -> tuple[str, str, StartPhases]:
    """The job id, node and phases of the deployment's ready replica once it is another job than ``after``."""
    found: list[dict[str, Any]] = []

    def ready() -> bool:
        found[:] = [r for r in rig.deployment(name)["replicas"]
                    if r["state"] == "ready" and r["job_id"] != after and r["phases"]]  # fmt: skip
        return bool(found)

    wait_until(ready, timeout=180, interval=1)
    replica = found[0]
    return replica["job_id"], str(urlsplit(replica["url"]).hostname), StartPhases.from_json(replica["phases"])


def test_every_start_records_its_phases_and_a_second_start_on_a_node_skips_the_cold_hash(
    rig: Rig, slurm: CliSlurmClient
) -> None:
    name = rig.name("phases")
    out = rig.cli("serve", MODEL, "--name", name, "--engine", "simulator", "--gpus-per-replica", "1",
                  "--min-replicas", "1", "--max-replicas", "1", "--wait", "--timeout", "180")  # fmt: skip
    assert out.returncode == 0, out.stderr
    total = sum(FILES.values())
    seen: set[str] = set()
    job: str | None = None
    for _ in range(MAX_STARTS):
        job, node, phases = next_start(rig, name, job)
        print(f"start on {node}: {phases.summary()}")
        assert set(phases.seconds()) == {
            "queue_wait",
            "staging",
            "engine_load",
            "first_healthy",
            "first_token",
        }
        if node in seen:  # the warm copy is good: nothing copied, nothing hashed, the cold copy not read
            assert (phases.staging.kind, phases.staging.bytes, phases.staging.hashed_bytes) == (
                "warm-valid",
                0,
                0,
            )
            break
        assert (phases.staging.kind, phases.staging.bytes) == ("copied", total)
        assert phases.staging.hashed_bytes == total  # the copies, checked (the cold bytes hashed as read)
        warm = rig.warm / node / MODEL
        assert sorted(read_manifest(warm)) == sorted(FILES) and (warm / MANIFEST).is_file()
        seen.add(node)
        slurm.cancel([job])  # SIGTERM: the replica drains and ends; the service starts another
    else:
        pytest.fail(f"no start landed on a node seen before in {MAX_STARTS} starts")
    verbose = rig.cli("deployments", "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    line = next(x for x in verbose.stdout.splitlines() if x.startswith(f"{name}/") and f"job {job} " in x)
    assert "staging warm-valid" in line and "first token" in line and "queue" in line, line

    def on_metrics() -> bool:
        return (name, "staging", "warm-valid") in rig.metrics()

    wait_until(on_metrics, timeout=60, interval=1)
    assert {phase for (dep, phase, _) in rig.metrics() if dep == name} >= {
        "queue_wait",
        "engine_load",
        "first_healthy",
        "first_token",
    }
