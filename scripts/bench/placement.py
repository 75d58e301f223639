"""Replay the Alibaba GPU 2023 (openb) pod trace through hpcserve's placement and a first-fit baseline.

Run from the repo root: scripts/bench/placement [--trace CSV] [--site YAML] [--scale 8] [--load 1 16]
[--limit N] [--no-background] (the wrapper runs this file with .venv/bin/python). The trace is read where
it lies, ../shared/traces/ beside the repo by default; nothing is copied.

Trace -> jobs (G = GPUs per node of the site, 8 on example-onprem):
- a pod with start and end times is a job that arrives at ``submit_time_s`` and runs ``duration_s``;
  pods that never ran (no start time) and 0-GPU pods are skipped;
- a multi-GPU pod (``num_gpus`` g >= 2) is a training job asking g x SCALE GPUs, as whole nodes:
  ceil(g x SCALE / G) nodes x G GPUs (one node of g x SCALE GPUs when that is less than a node). The
  default SCALE = G makes each trace GPU one whole node: the 2/4/8-GPU pods become 2/4/8-node jobs;
- a 1-GPU pod stays 1 node x 1 GPU (background, on unless --no-background): the small jobs that leave
  nodes partly used. Both policies place them too, each by its own rule.
Simulation: event-driven over the trace's times, departures before arrivals at equal times, every node of
the site a candidate. No queue: a job that cannot start when it arrives counts as not placed (for
hpcserve that includes "wait for few leaves" and "never fits" answers). At the trace's own pace the
64-node example site is lightly loaded (mean ~32 GPUs busy, peak ~250 of 512), so the replay runs at
each --load factor: arrival times are compressed by that factor (durations kept), which multiplies the
offered load; 1 is the trace as recorded.

Figures, per policy:
- jobs placed, all and multi-node;
- one-leaf share: among placed multi-node jobs for which some leaf switch had enough usable nodes at
  arrival, the share placed inside one leaf (goal >= 95% for hpcserve);
- mean leaf switches per placed multi-node job, and jobs placed across two fabric islands;
- fragmentation, as time-weighted means from the first arrival to the last: stranded GPUs (free GPUs on
  partly used nodes, which no whole-node job can use; also as a share of free GPUs), and the largest
  one-leaf block (the most idle nodes on any one leaf: the biggest whole-node job that could start on
  one leaf). Fewer stranded GPUs and a larger block mean less fragmentation.
Always exits 0 when the trace and site load: it reports PASS/MISS against the goal, it does not test.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from hpcserve.config import SiteConfig, load_site_config
from hpcserve.placement import (
    FabricTopology,
    Placement,
    PlacementError,
    PlacementRequest,
    build_fabric_topology,
    first_fit,
    select_nodes,
)
from hpcserve.slurm.models import ClusterSnapshot, Node, Topology

REPO = Path(__file__).resolve().parents[2]
TRACE = REPO.parent / "shared" / "traces" / "alibaba_gpu2023_openb_pods.csv"
SITE = REPO / "site_configs" / "example-onprem.yaml"
ONE_LEAF_GOAL = 0.95
Policy = Callable[[PlacementRequest, ClusterSnapshot, FabricTopology], Placement]
AT = datetime(2023, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class TraceJob:
    arrival: float
    duration: float
    nodes: int
    gpus_per_node: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path, default=TRACE, help=f"openb pod CSV (default {TRACE})")
    p.add_argument("--site", type=Path, default=SITE, help="site config with leaf switches (default onprem)")
    p.add_argument("--scale", type=int, default=0, help="GPUs per trace GPU of multi-GPU pods (default: G)")
    p.add_argument("--load", type=float, nargs="+", default=[1.0, 16.0], help="load factors (default 1 16)")
    p.add_argument("--limit", type=int, default=0, help="replay only the first N jobs (default all)")
    p.add_argument("--no-background", dest="background", action="store_false", help="skip 1-GPU pods")
    args = p.parse_args(argv)
    if args.scale < 0 or args.limit < 0 or min(args.load) <= 0:
        p.error("--scale and --limit must be >= 0, --load factors > 0")
    return args


def to_job(row: dict[str, str], per_node: int, scale: int, background: bool) -> TraceJob | None:
    """One pod as a job, or None when it never ran, holds no GPU, or is background that is switched off."""
    pod_gpus = int(row["num_gpus"] or 0)
    if not row["start_time_s"] or not row["duration_s"] or pod_gpus < 1:
        return None
    if pod_gpus == 1 and not background:
        return None
    arrival, duration = float(row["submit_time_s"]), max(float(row["duration_s"]), 0.0)
    if pod_gpus == 1:
        return TraceJob(arrival, duration, 1, 1)
    gpus = pod_gpus * scale
    if gpus < per_node:
        return TraceJob(arrival, duration, 1, gpus)
    return TraceJob(arrival, duration, math.ceil(gpus / per_node), per_node)


def read_jobs(path: Path, per_node: int, scale: int, background: bool, limit: int) -> list[TraceJob]:
    with path.open(newline="") as handle:
        jobs = [job for row in csv.DictReader(handle) if (job := to_job(row, per_node, scale, background))]
    jobs.sort(key=lambda job: job.arrival)
    return jobs[:limit] if limit else jobs


def compressed(jobs: list[TraceJob], load: float) -> list[TraceJob]:
    """Arrivals ``load`` times closer together after the first, durations unchanged."""
    first = jobs[0].arrival if jobs else 0.0
    return [TraceJob(first + (j.arrival - first) / load, j.duration, j.nodes, j.gpus_per_node) for j in jobs]


class Cluster:
    """The simulated nodes: GPUs allocated per node, changed as jobs start and end (the bench's state)."""

    def __init__(self, site: SiteConfig, topology: FabricTopology) -> None:
        self.total = {node: site.gpus_of(node) for node in site.all_nodes()}
        self.alloc = dict.fromkeys(self.total, 0)
        self.topology = topology

    def snapshot(self) -> ClusterSnapshot:
        nodes = tuple(
            Node(name, _state(used, self.total[name]), gpus_total=self.total[name], gpus_alloc=used)
            for name, used in self.alloc.items()
        )
        return ClusterSnapshot(at=AT, nodes=nodes, jobs=(), partitions=())

    def take(self, nodes: tuple[str, ...], gpus: int, sign: int = 1) -> None:
        for node in nodes:
            self.alloc[node] += sign * gpus

    def stranded_and_free(self) -> tuple[int, int]:
        """(free GPUs on partly used nodes, free GPUs in all)."""
        free = {n: self.total[n] - a for n, a in self.alloc.items()}
        return sum(f for n, f in free.items() if self.alloc[n] > 0 and f > 0), sum(free.values())

    def largest_leaf_block(self) -> int:
        leaves = self.topology.leaves.values()
        return max((sum(self.alloc[n] == 0 for n in nodes) for nodes in leaves), default=0)

    def one_leaf_fits(self, job: TraceJob) -> bool:
        return any(
            sum(self.total[n] - self.alloc[n] >= job.gpus_per_node for n in nodes) >= job.nodes
            for nodes in self.topology.leaves.values()
        )


def _state(alloc: int, total: int) -> str:
    return "idle" if alloc == 0 else ("allocated" if alloc >= total else "mixed")


@dataclass(slots=True)
class Stats:
    """Counts and time integrals of one replay."""

    jobs: int = 0
    placed: int = 0
    multi: int = 0
    multi_placed: int = 0
    one_leaf_feasible: int = 0
    one_leaf_used: int = 0
    leaves_sum: int = 0
    island_crossing: int = 0
    stranded_gpu_s: float = 0.0  # time integrals, for the time-weighted means
    free_gpu_s: float = 0.0
    block_node_s: float = 0.0
    span_s: float = 0.0

    def record(self, job: TraceJob, placement: Placement | None, one_leaf_fits: bool) -> None:
        self.jobs += 1
        placed = placement is not None and placement.fits_now
        self.placed += placed
        if job.nodes < 2:
            return
        self.multi += 1
        if placement is None or not placed:
            return
        self.multi_placed += 1
        self.leaves_sum += len(placement.leaves)
        self.island_crossing += "+" in placement.fabric
        self.one_leaf_feasible += one_leaf_fits
        self.one_leaf_used += one_leaf_fits and len(placement.leaves) == 1

    def sample(self, cluster: Cluster, seconds: float) -> None:
        """Weight the current fragmentation by how long it lasts."""
        stranded, free = cluster.stranded_and_free()
        self.stranded_gpu_s += stranded * seconds
        self.free_gpu_s += free * seconds
        self.block_node_s += cluster.largest_leaf_block() * seconds
        self.span_s += seconds

    def figures(self) -> dict[str, float]:
        span = self.span_s or 1.0
        return {
            "jobs placed": self.placed,
            "multi-node jobs placed": self.multi_placed,
            "one-leaf share (%)": 100 * self.one_leaf_used / max(self.one_leaf_feasible, 1),
            "mean leaves per multi-node job": self.leaves_sum / max(self.multi_placed, 1),
            "jobs across two islands": self.island_crossing,
            "stranded GPUs (mean)": self.stranded_gpu_s / span,
            "stranded share of free GPUs (%)": 100 * self.stranded_gpu_s / (self.free_gpu_s or 1.0),
            "largest one-leaf block (mean nodes)": self.block_node_s / span,
        }


def decide(policy: Policy, job: TraceJob, cluster: Cluster) -> Placement | None:
    request = PlacementRequest(nodes=job.nodes, gpus_per_node=job.gpus_per_node)
    try:
        return policy(request, cluster.snapshot(), cluster.topology)
    except PlacementError:
        return None


Departure = tuple[float, int, tuple[str, ...], int]  # (time, sequence, nodes, GPUs per node)


def events(jobs: list[TraceJob], departures: list[Departure]) -> Iterator[TraceJob | Departure]:
    """Arrivals in order, each preceded by the departures due by then (departures come first on ties)."""
    for job in jobs:
        while departures and departures[0][0] <= job.arrival:
            yield heapq.heappop(departures)
        yield job


def simulate(policy: Policy, jobs: list[TraceJob], site: SiteConfig, topology: FabricTopology) -> Stats:
    cluster, stats = Cluster(site, topology), Stats()
    departures: list[Departure] = []
    now = jobs[0].arrival if jobs else 0.0
    for seq, event in enumerate(events(jobs, departures)):
        at = event.arrival if isinstance(event, TraceJob) else event[0]
        stats.sample(cluster, at - now)
        now = at
        if not isinstance(event, TraceJob):
            cluster.take(event[2], event[3], sign=-1)
            continue
        fits_one_leaf = event.nodes > 1 and cluster.one_leaf_fits(event)
        placement = decide(policy, event, cluster)
        stats.record(event, placement, fits_one_leaf)
        if placement is not None and placement.fits_now:
            cluster.take(placement.nodes, event.gpus_per_node)
            heapq.heappush(departures, (now + event.duration, seq, placement.nodes, event.gpus_per_node))
    return stats


def describe(jobs: list[TraceJob], site: SiteConfig, topology: FabricTopology, scale: int) -> str:
    multi = [job for job in jobs if job.nodes > 1]
    sizes = sorted({job.nodes for job in multi})
    islands = topology.islands()
    return (
        f"site {site.name}: {len(site.all_nodes())} nodes, {len(topology.leaves)} leaf switches, "
        f"{len(islands)} fabric islands ({', '.join(f'{k}: {len(v)} leaves' for k, v in islands.items())})\n"
        f"jobs: {len(jobs)} ({len(multi)} multi-node of {sizes} nodes, scale {scale}; "
        f"{sum(job.nodes == 1 for job in jobs)} one-node)"
    )


def report(load: float, results: dict[str, dict[str, float]]) -> None:
    ours, base = results["hpcserve"], results["first-fit"]
    print(f"\n{f'load x{load:g}':<38} {'hpcserve':>10} {'first-fit':>10} {'ratio':>8}")
    for name, value in ours.items():
        other = base[name]
        ratio = f"{value / other:.2f}" if other else "-"
        print(f"{name:<38} {_cell(value):>10} {_cell(other):>10} {ratio:>8}")
    share = ours["one-leaf share (%)"]
    verdict = "PASS" if share >= 100 * ONE_LEAF_GOAL else "MISS"
    goal = f"hpcserve places >= {ONE_LEAF_GOAL:.0%} of multi-node jobs in one leaf when one fits"
    print(f"goal at load x{load:g}: {goal}: {share:.1f}% {verdict}")


def _cell(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.2f}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    site = load_site_config(args.site)
    topology = build_fabric_topology(Topology(), site)
    per_node = max(site.gpus_of(node) for node in site.all_nodes())
    scale = args.scale or per_node
    if not args.trace.is_file():
        raise SystemExit(f"trace not found: {args.trace}; pass --trace PATH/alibaba_gpu2023_openb_pods.csv")
    jobs = read_jobs(args.trace, per_node, scale, args.background, args.limit)
    print(f"trace {args.trace}\n{describe(jobs, site, topology, scale)}")
    for load in args.load:
        replayed = compressed(jobs, load)
        results: dict[str, dict[str, float]] = {}
        for name, policy in (("hpcserve", select_nodes), ("first-fit", first_fit)):
            start = time.perf_counter()
            results[name] = simulate(policy, replayed, site, topology).figures()
            print(f"  load x{load:g}, {name}: replayed in {time.perf_counter() - start:.1f} s")
        report(load, results)


if __name__ == "__main__":
    main()
