"""Scale-up overhead on the local cluster: from the autoscaler's decision to a READY replica, minus the time
Slurm itself takes from sbatch to RUNNING for a job on the same partition.

Run from the repo root: scripts/bench/scale_up [--runs 5] [--tick 0.2] (needs the local cluster up:
scripts/minicluster.sh start). Each run stores a deployment of the engine simulator at zero replicas, sets
its desired count to 1 (the decision), then ticks the serving controller every --tick seconds until the
replica is ready: submitit's pickle and sbatch, Slurm scheduling, the job's start, the engine's start and
/health, the announcement, and the controller noticing it. Slurm's own part is measured in the same run
with a plain ``sbatch --wrap true`` to the same partition, polled the same way. Prints medians and the
overhead; the goal is <= 2 s. Always exits 0: it reports PASS/MISS, it does not test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import yaml

from hpcserve.config import Policy, SiteConfig, load_policy, load_site_config
from hpcserve.service.server import ApiServer
from hpcserve.serving.spec import build_deployment
from hpcserve.serving.wiring import make_controller
from hpcserve.store import HistoryStore

REPO = Path(__file__).resolve().parents[2]
GOAL_S = 2.0
POLL_S = 0.02


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="scale-ups and plain jobs each (default 5)")
    p.add_argument("--tick", type=float, default=0.2, help="controller tick in seconds (default 0.2)")
    p.add_argument("--partition", default="infer", help="partition of both (default infer)")
    p.add_argument("--owner", default="alice", help="the deployment's owner: its replicas run as this user")
    return p.parse_args()


def slurm_to_running(partition: str) -> float:
    """sbatch -> RUNNING for a plain one-GPU job, polled every POLL_S."""
    start = time.monotonic()
    argv = ["sbatch", "--parsable", "-p", partition, "--gres=gpu:1", "-t", "2", "-o", "/dev/null", "--wrap",
            "sleep 30"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    job_id = out.stdout.strip()
    try:
        while _state(job_id) != "RUNNING":
            time.sleep(POLL_S)
        return time.monotonic() - start
    finally:
        subprocess.run(["scancel", job_id], check=False)


def _state(job_id: str) -> str:
    out = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, check=False
    )
    return out.stdout.strip()


def scale_up(store: HistoryStore, controller_tick: Callable[[], None], name: str, tick_s: float) -> float:
    """Decision (desired 0 -> 1) -> replica ready, ticking the controller every ``tick_s``."""
    start = time.monotonic()
    store.set_desired(name, 1, user="root")
    while not any(r.state == "ready" for r in store.replicas(name)):
        controller_tick()
        time.sleep(tick_s)
    return time.monotonic() - start


def scale_down(store: HistoryStore, controller_tick: Callable[[], None], name: str) -> None:
    store.set_desired(name, 0, user="root")
    while store.replicas(name):
        controller_tick()
        time.sleep(0.2)


def start_api(site: SiteConfig, policy: Policy, store: HistoryStore) -> ApiServer:
    from hpcserve.service.main import start_api as serve_api

    os.environ["HPCSERVE_SOCKET"] = site.service.socket
    return serve_api(site, policy, store)


def main() -> int:
    args = parse_args()
    os.environ.setdefault("SLURM_CONF", "/tmp/hpcserve-mc/etc/slurm.conf")
    site = load_site_config(REPO / "site_configs" / "minicluster.yaml")
    policy = load_policy(REPO / "policies" / "default.yaml")
    with tempfile.TemporaryDirectory(prefix="hpcserve-bench-", dir="/tmp") as tmp:
        Path(tmp).chmod(0o755)  # the owner's replica job reaches the API socket in here
        store = HistoryStore(f"sqlite:///{tmp}/state/bench.db", admins=["root"])
        store.upgrade()
        name = f"bench-{uuid.uuid4().hex[:6]}"
        spec = build_deployment({"name": name, "model": "bench", "engine": "simulator", "gpus_per_replica": 1,
                                 "min_replicas": 0, "max_replicas": 1, "idle_to_zero_s": 0})  # fmt: skip
        store.create_deployment(name, args.owner, spec.model_dump(mode="json"), 0)
        data = yaml.safe_load((REPO / "site_configs" / "minicluster.yaml").read_text())
        data["serving"]["replica_dir"] = f"{tmp}/replicas"
        data["service"] = {"socket": f"{tmp}/api.sock"}
        site = type(site).model_validate(data)
        api = start_api(site, policy, store)  # replicas announce themselves to the service's API
        controller = make_controller(site, policy, store)
        controller.autoscaler = lambda deployment, *_: (deployment.desired_replicas, None)  # decisions: ours
        tick = controller.tick
        ours, plain = [], []
        for run in range(args.runs):
            plain.append(slurm_to_running(args.partition))
            ours.append(scale_up(store, tick, name, args.tick))
            print(f"  run {run + 1}: sbatch->RUNNING {plain[-1]:.2f} s, decision->ready {ours[-1]:.2f} s")
            scale_down(store, tick, name)
        store.delete_deployment(name, user="root")
        api.stop()
    report(statistics.median(ours), statistics.median(plain), args.tick)
    return 0


def report(ours: float, plain: float, tick: float) -> None:
    overhead = ours - plain
    verdict = "PASS" if overhead <= GOAL_S else "MISS"
    print(
        f"\nmedian decision->ready {ours:.2f} s, Slurm's own sbatch->RUNNING {plain:.2f} s (tick {tick:g} s)"
    )
    print(f"scale-up overhead beyond Slurm's own = {overhead:.2f} s (goal <= {GOAL_S:g} s)  {verdict}")
    print(f"at {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")


if __name__ == "__main__":
    raise SystemExit(main())
