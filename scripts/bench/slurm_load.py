"""How hard hpcserve's service calls slurmctld: RPCs counted by slurmctld itself (``sdiag``), per controller
tick, with each part of the service reading Slurm on its own (the baseline, ``--no-shared-slurm-view``)
and with the shared view (one squeue and one sinfo per tick at most, shared by the controller, the sampler
and the planner).

Run as root from the repo root, on the local cluster (source /tmp/hpcserve-mc/env.sh):
    scripts/bench/slurm_load [--jobs 10000] [--deployments 10] [--minutes 3]
The service runs as the ``hpcserve`` service account, and the figures are sdiag's RPCs of that user, so
other users' Slurm calls on a shared cluster do not count (the types shown are everyone's, for context).
A slurmctld restart during a variant resets sdiag: the run says so and its figures are not to be trusted.
It submits ``--jobs`` held jobs as carol (a queue to read), writes ``--deployments`` deployments at zero
replicas into a fresh database, then for each variant starts ``hpcserve service`` (controller every 2 s,
sampler every 30 s, rebalancer every 60 s), resets slurmctld's statistics (``sdiag --reset``), waits
``--minutes`` and reads ``sdiag``. Counted: the client RPC types (job, node, partition, topology, federation
and ping reads); slurmd's own messages and sdiag's are not. Always exits 0: PASS/MISS against the goals
(at most 2 RPCs per tick; at least 5x fewer than the baseline).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_vs_squeue import count_queued, submit_one

REPO = Path(__file__).resolve().parents[2]
TICK_S = 2.0
COUNTED = ("REQUEST_JOB_INFO", "REQUEST_JOB_INFO_SINGLE", "REQUEST_NODE_INFO", "REQUEST_PARTITION_INFO",
           "REQUEST_TOPO_INFO", "REQUEST_FED_INFO", "REQUEST_PING", "REQUEST_BUILD_INFO",
           "REQUEST_JOB_USER_INFO", "REQUEST_RESERVATION_INFO", "REQUEST_LICENSE_INFO")  # fmt: skip
PER_TICK_GOAL, RATIO_GOAL = 2.0, 5.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=10000, help="held jobs in the queue (default 10000)")
    p.add_argument("--deployments", type=int, default=10, help="deployments at zero (default 10)")
    p.add_argument("--minutes", type=float, default=3.0, help="measured minutes per variant (default 3)")
    return p.parse_args()


SERVICE_USER = "hpcserve"


def sdiag() -> str:
    return subprocess.run(["sdiag"], capture_output=True, text=True, check=True).stdout


def rpc_counts(out: str) -> dict[str, int]:
    """Everyone's client RPCs by type."""
    section = out.split("by message type", 1)[1].split("by user", 1)[0]
    found = re.finditer(r"^\s*(\w+)\s+\(\s*\d+\)\s+count:(\d+)", section, re.M)
    return {m.group(1): int(m.group(2)) for m in found if m.group(1) in COUNTED}


def user_rpcs(out: str, user: str) -> int:
    """All RPCs of ``user`` (sdiag counts by user without types)."""
    section = out.split("by user", 1)[1].split("Pending RPC", 1)[0]
    found = re.search(rf"^\s*{re.escape(user)}\s+\(\s*\d+\)\s+count:(\d+)", section, re.M)
    return int(found.group(1)) if found else 0


def data_since(out: str) -> str:
    found = re.search(r"Data since\s+(.*)", out)
    return found.group(1).strip() if found else ""


def submit_queue(name: str, n: int) -> None:
    argv = ["runuser", "-u", "carol", "--", "sbatch", "-H", "--parsable", "-t", "5", "-p", "all", "-J", name,
            "-o", "/dev/null", "--wrap", "true"]  # fmt: skip
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(submit_one, [argv] * n))
    for _ in range(60):
        if count_queued(name) >= n:
            return
        time.sleep(1)
    raise RuntimeError(f"only {count_queued(name)} of {n} jobs named {name} are queued")


def setup(root: Path, deployments: int) -> dict[str, str]:
    site = yaml.safe_load((REPO / "site_configs" / "minicluster.yaml").read_text())
    # no replica is ever launched here: sudo is named only because the service does not run as root
    site["service"] = {"socket": str(root / "api.sock"), "submit_as": "sudo"}
    site["database"] = {"url": f"sqlite:///{root / 'hpcserve.db'}"}
    site["serving"] = {
        **site["serving"],
        "controller_interval_s": TICK_S,
        "replica_dir": str(root / "replicas"),
    }
    (root / "site.yaml").write_text(yaml.safe_dump(site))
    root.chmod(0o755)
    env = {**os.environ, "HPCSERVE_SITE": str(root / "site.yaml"),
           "HPCSERVE_POLICY": str(REPO / "policies" / "default.yaml")}  # fmt: skip
    hpcserve = str(Path(sys.executable).parent / "hpcserve")
    subprocess.run([hpcserve, "db", "upgrade"], env=env, check=True, capture_output=True)
    from hpcserve.serving.spec import DeploymentSpec
    from hpcserve.store import HistoryStore

    with HistoryStore(site["database"]["url"], admins=["root"]) as store:
        for k in range(deployments):
            name = f"load-{k}"
            spec = DeploymentSpec.model_validate({"name": name, "model": name, "engine": "simulator",
                                                  "min_replicas": 0}).model_dump(mode="json")  # fmt: skip
            store.create_deployment(name, "alice", spec, 0, served_model_name=name)
    shutil.chown(root, SERVICE_USER)
    for path in root.iterdir():
        if path.name.startswith("hpcserve.db"):
            shutil.chown(path, SERVICE_USER)
    return env


def measure(env: dict[str, str], shared: bool, minutes: float, log: Path) -> tuple[int, dict[str, int]]:
    """The service account's RPCs over ``minutes``, and everyone's by type."""
    hpcserve = str(Path(sys.executable).parent / "hpcserve")
    argv = [
        "runuser",
        "-u",
        SERVICE_USER,
        "--",
        hpcserve,
        "service",
        "--metrics-port",
        "0",
        "--sample-interval",
        "30",
        "--rebalance-interval",
        "60",
    ]
    if not shared:
        argv.append("--no-shared-slurm-view")
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        time.sleep(5)  # started: its first round of every job
        subprocess.run(["sdiag", "--reset"], check=True, capture_output=True)
        since = data_since(sdiag())
        time.sleep(minutes * 60)
        stats = sdiag()
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise SystemExit(f"the service ({log.stem}) exited with {proc.returncode}:\n" + "\n".join(tail))
        if data_since(stats) != since:
            print(f"WARNING: sdiag was reset during this variant (slurmctld restarted?): rerun ({log.stem})")
        return user_rpcs(stats, SERVICE_USER), rpc_counts(stats)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def report(label: str, measured: tuple[int, dict[str, int]], minutes: float) -> float:
    total, counts = measured
    ticks = minutes * 60 / TICK_S
    detail = ", ".join(
        f"{k.removeprefix('REQUEST_')} {v}" for k, v in sorted(counts.items(), key=lambda i: -i[1])
    )
    print(f"{label:<34} {total:6d} RPCs  {total / ticks:5.2f} per tick   (everyone's by type: {detail})")
    return total


def main() -> int:
    args = parse_args()
    name = f"hpcserve-load-{uuid.uuid4().hex[:8]}"
    root = Path(tempfile.mkdtemp(prefix="hps-load-", dir="/tmp"))
    print(
        f"{args.jobs} held jobs ({name}), {args.deployments} deployments at zero, {args.minutes:g} min each,"
        f" controller tick {TICK_S:g} s"
    )
    try:
        submit_queue(name, args.jobs)
        env = setup(root, args.deployments)
        before = measure(env, False, args.minutes, root / "before.log")
        after = measure(env, True, args.minutes, root / "after.log")
        print()
        b = report("each part reads Slurm (before)", before, args.minutes)
        a = report("one shared view per tick (after)", after, args.minutes)
        per_tick = a / (args.minutes * 60 / TICK_S)
        ratio = b / a if a else float("inf")
        print(
            f"\nper tick (after) = {per_tick:.2f} (goal <= {PER_TICK_GOAL:g})  "
            f"{'PASS' if per_tick <= PER_TICK_GOAL else 'MISS'}"
        )
        verdict = "PASS" if ratio >= RATIO_GOAL else "MISS"
        print(f"before / after = {ratio:.2f}x (goal >= {RATIO_GOAL:g}x)  {verdict}")
    finally:
        subprocess.run(["scancel", "-n", name, "-u", "carol"], capture_output=True, check=False)
        if os.environ.get("KEEP"):
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
