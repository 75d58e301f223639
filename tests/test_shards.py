"""Fractional GPUs: the spec's gpu_fraction / mig_profile rules, the GRES a replica asks for, the engine's
memory share, the shard parsing of recorded ``sinfo --json`` output, packing onto the fewest GPUs, and
``hpcserve nodes``'s shard column."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcserve.config import load_policy, load_site_config
from hpcserve.errors import ValidationError
from hpcserve.inventory import node_views, shards_cell
from hpcserve.jobs.callables import executor_parameters
from hpcserve.jobs.submit import plan
from hpcserve.model.cluster import ClusterSnapshot, Node, Partition, Topology
from hpcserve.placement import FabricTopology, build_fabric_topology
from hpcserve.placement.shards import choose_shard_node, part_gres, shard_count, shards_for
from hpcserve.serving.launcher import replica_request
from hpcserve.serving.spec import DeploymentSpec, build_deployment
from hpcserve.serving.vllm_cmd import simulator_argv, vllm_serve_argv
from hpcserve.slurm.parsers import gres_used_indices, parse_shard_gres, parse_sinfo_json, tres_count

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
SITE = load_site_config(ROOT / "site_configs" / "minicluster.yaml")
POLICY = load_policy(ROOT / "policies" / "default.yaml")
AT = datetime(2026, 12, 7, tzinfo=UTC)


def spec(**fields: object) -> DeploymentSpec:
    return build_deployment({"name": "small", "model": "org/small-1b", **fields})


# ------------------------------------------------------------------------------------------------ spec
def test_a_fraction_or_a_mig_profile_is_part_of_one_gpu() -> None:
    assert spec(gpu_fraction=0.25).gpu_fraction == 0.25
    assert spec(mig_profile="1g.10gb").mig_profile == "1g.10gb"
    assert spec(mig_profile="a100_3g.40gb", engine="simulator").mig_profile == "a100_3g.40gb"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"gpu_fraction": 0.25, "mig_profile": "1g.10gb"},
         "--mig-profile: set together with gpu_fraction (fix: keep one: gpu_fraction (GPU shards) or "
         "mig_profile (a MIG slice))"),
        ({"gpu_fraction": 0.5, "gpus_per_replica": 2},
         "--gpu-fraction: is part of one GPU, but gpus_per_replica is 2 (fix: set gpus_per_replica: 1, or "
         "drop gpu_fraction to use whole GPUs)"),
        ({"gpu_fraction": 0.5, "nodes_per_replica": 2},
         "--gpu-fraction: is part of one GPU, but nodes_per_replica is 2"),
        ({"mig_profile": "2g.20gb", "gpus_per_replica": 0, "engine": "simulator"},
         "--mig-profile: is part of one GPU, but gpus_per_replica is 0"),
        ({"mig_profile": "half"}, "--mig-profile: 'half' is not a MIG profile name (fix: use the name"),
        ({"mig_profile": "9g.10gb"}, "--mig-profile: '9g.10gb' is not a MIG profile name"),
        ({"gpu_fraction": 1.0}, "--gpu-fraction: "),
        ({"gpu_fraction": 0}, "--gpu-fraction: "),
    ],
)  # fmt: skip
def test_part_of_a_gpu_refused_in_one_line_naming_the_flag(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        spec(**fields)
    text = str(exc.value)
    assert text.startswith(message) and "\n" not in text and "(fix: " in text


# ------------------------------------------------------------------------------------------------ gres
@pytest.mark.parametrize(
    ("fraction", "per_gpu", "shards"),
    [(0.25, 4, 1), (0.5, 4, 2), (0.3, 4, 2), (0.3, 10, 3), (0.01, 4, 1), (0.99, 4, 4), (0.125, 8, 1)],
)
def test_a_fraction_takes_its_shards_rounded_up(fraction: float, per_gpu: int, shards: int) -> None:
    assert shards_for(fraction, per_gpu) == shards


def test_the_gres_a_part_of_a_gpu_asks_for() -> None:
    assert part_gres(0.25, None, 4) == "shard:1"
    assert part_gres(None, "1g.10gb", 4) == "gpu:1g.10gb:1"
    assert part_gres(None, None, 4) is None
    assert shard_count("shard:3") == 3 and shard_count("shard:l40s:2") == 2
    assert shard_count("gpu:1g.10gb:1") is None and shard_count(None) is None


def test_a_fractional_replica_asks_for_shards_not_gpus() -> None:
    request = replica_request(spec(gpu_fraction=0.5), 0, "alice", shards_per_gpu=4)
    assert request.gres == request.gres_option == "shard:2" and request.gpus_per_node == request.gpus == 0
    mig = replica_request(spec(mig_profile="1g.10gb"), 1, "alice")
    assert (mig.gres, mig.gpus_per_node) == ("gpu:1g.10gb:1", 0)
    whole = replica_request(spec(gpus_per_replica=2), 0, "alice")
    assert (whole.gres, whole.gpus_per_node, whole.gres_option) == (None, 2, "gpu:2")


def test_the_shard_gres_reaches_sbatch_and_submitit() -> None:
    job, _ = plan(replica_request(spec(gpu_fraction=0.25), 0, "alice"), POLICY, snapshot(), topology(),
                  kind="replica")  # fmt: skip
    assert "--gres=shard:1" in job.sbatch_args()
    assert not any(a.startswith("--gres=gpu") for a in job.sbatch_args())
    assert executor_parameters(job)["gres"] == "shard:1"
    mig, _ = plan(replica_request(spec(mig_profile="1g.10gb"), 0, "alice"), POLICY, snapshot(), topology(),
                  kind="replica")  # fmt: skip
    assert "--gres=gpu:1g.10gb:1" in mig.sbatch_args() and executor_parameters(mig)["gres"] == "gpu:1g.10gb:1"


# ------------------------------------------------------------------------------------------------ engine
def test_the_engine_gets_the_fraction_as_its_memory_share() -> None:
    argv = vllm_serve_argv(spec(gpu_fraction=0.25), "node5", 8000)
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.25"
    own = vllm_serve_argv(spec(gpu_fraction=0.25, engine_args={"gpu_memory_utilization": 0.2}), "h", 1)
    assert own.count("--gpu-memory-utilization") == 1 and "0.2" in own and "0.25" not in own
    assert "--gpu-memory-utilization" not in vllm_serve_argv(spec(), "h", 1)
    sim = simulator_argv(spec(gpu_fraction=0.25, engine="simulator"), "h", 1)
    assert sim[sim.index("--gpu-memory-utilization") + 1] == "0.25"
    assert "--gpu-memory-utilization" not in simulator_argv(spec(engine="simulator"), "h", 1)


# ------------------------------------------------------------------------------------------------ parsing
def test_shards_parsed_from_recorded_sinfo_json() -> None:
    nodes = {n.name: n for n in parse_sinfo_json((DATA / "sinfo_shards.json").read_text())}
    node7, node4 = nodes["node7"], nodes["node4"]
    # two shard:1 jobs and a shard:2 job on GPU 0, a gpu:1 job on GPU 1
    assert (node7.shards_total, node7.shards_alloc, node7.shard_gpus, node7.whole_gpus) == (16, 4, (0,), (1,))
    assert (node7.gpus_total, node7.gpus_alloc, node7.shards_per_gpu, node7.gpus_free) == (4, 1, 4, 2)
    assert (node4.shards_total, node4.shards_alloc, node4.shard_gpus, node4.gpus_free) == (0, 0, (), 4)


def test_gres_strings() -> None:
    assert parse_shard_gres("gpu:l40s:4,shard:l40s:16") == 16
    assert parse_shard_gres("gpu:4(S:0-1),shard:8") == 8 and parse_shard_gres("gpu:h100:4") == 0
    used = "gpu:l40s:1(IDX:2),shard:l40s:2(IDX:0-1,3)"
    assert gres_used_indices(used, "gpu") == (2,) and gres_used_indices(used, "shard") == (0, 1, 3)
    assert gres_used_indices("gpu:h100:0(IDX:N/A),shard:0", "shard") == ()
    assert tres_count("cpu=7,mem=7G,gres/gpu=1,gres/shard=7", "gres/shard") == 7
    assert tres_count("cpu=1", "gres/shard") == 0


# ------------------------------------------------------------------------------------------------ packing
def shard_node(name: str, shards: int = 0, on: tuple[int, ...] = (), whole: int = 0, state: str = "") -> Node:
    """A 4-GPU node cut into 4 shards per GPU, with ``shards`` in use on GPUs ``on`` and ``whole`` GPUs
    allocated whole (indices after the shard GPUs)."""
    idx = tuple(range(len(on), len(on) + whole))
    busy = shards or whole
    return Node(name, state or ("mixed" if busy else "idle"), gpus_total=4, gpus_alloc=whole, shards_total=16,
                shards_alloc=shards, shard_gpus=on, whole_gpus=idx)  # fmt: skip


def test_a_gpu_already_serving_shards_comes_first() -> None:
    nodes = [shard_node("node5"), shard_node("node6", 2, (0,)), shard_node("node7", 3, (0,))]
    choice = choose_shard_node(1, nodes)
    assert choice is not None and choice.node == "node7"  # best fit: its GPU 0 has one shard left
    assert "already serving shards" in choice.reason
    assert choose_shard_node(2, nodes).node == "node6"  # type: ignore[union-attr]  # node7 has 1 left


def test_then_a_new_gpu_on_a_node_already_sharing_then_the_busiest_node() -> None:
    sharing = [shard_node("node5", whole=1), shard_node("node6", 4, (0,)), shard_node("node7", whole=2)]
    assert choose_shard_node(1, sharing).node == "node6"  # type: ignore[union-attr]
    fresh = [shard_node("node5", whole=1), shard_node("node7", whole=2)]
    choice = choose_shard_node(1, fresh)
    assert choice is not None and choice.node == "node7" and "fewest free GPUs" in choice.reason


def test_nodes_without_room_or_shards_or_out_of_reach_are_skipped() -> None:
    plain = Node("node1", "idle", gpus_total=4)
    full = shard_node("node5", whole=4, state="allocated")
    drained = Node("node6", "idle", flags=frozenset({"DRAIN"}), gpus_total=4, shards_total=16)
    elsewhere = shard_node("node8")
    assert choose_shard_node(1, [plain, full, drained]) is None
    assert choose_shard_node(1, [plain, full, drained, elsewhere], candidates=frozenset({"node5"})) is None
    assert choose_shard_node(5, [elsewhere]) is None  # more shards than one GPU has


def test_shards_just_submitted_count_so_two_small_replicas_share_a_gpu() -> None:
    nodes = [shard_node("node5"), shard_node("node6", whole=1)]
    first = choose_shard_node(1, nodes)
    assert first is not None
    second = choose_shard_node(1, nodes, submitted={first.node: 1})
    assert second is not None and second.node == first.node and "already serving shards" in second.reason
    after_four = choose_shard_node(1, nodes, submitted={first.node: 4})  # GPU full: a new one, same node
    assert after_four is not None and after_four.node == first.node


def test_the_submitter_names_the_packing_node() -> None:
    request = replica_request(spec(gpu_fraction=0.25), 0, "alice")
    job, reason = plan(request, POLICY, snapshot(shard_node("node5"), shard_node("node6", 1, (0,))),
                       topology(), kind="replica")  # fmt: skip
    assert job.nodelist == ("node6",) and "--nodelist=node6" in job.sbatch_args() and "node6" in reason
    job, reason = plan(request, POLICY, snapshot(), topology(), kind="replica")
    assert job.nodelist == () and "Slurm chooses" in reason


def snapshot(*nodes: Node) -> ClusterSnapshot:
    infer = Partition("infer", tuple(f"node{i}" for i in range(5, 9)))
    return ClusterSnapshot(at=AT, nodes=tuple(nodes), jobs=(), partitions=(infer,))


def topology() -> FabricTopology:
    return build_fabric_topology(Topology(), SITE)


# ------------------------------------------------------------------------------------------------ display
def test_nodes_shows_shards_in_use() -> None:
    views = {v.name: v for v in node_views(_nodes(), SITE)}
    assert shards_cell(views["node7"]) == "3/16 on GPU 0"
    assert shards_cell(views["node5"]) == "0/16" and shards_cell(views["node1"]) == ""
    node7 = views["node7"]
    assert (node7.shards_used, node7.shards_total, node7.shard_gpus) == (3, 16, (0,))


def _nodes() -> Iterable[Node]:
    return [Node("node1", "idle", gpus_total=4), shard_node("node5"), shard_node("node7", 3, (0,))]


# ------------------------------------------------------------------------------------------------ property
@st.composite
def shard_cluster(draw: st.DrawFn) -> list[Node]:
    """Up to 5 nodes of 4 GPUs x 4 shards, each with some GPUs whole-allocated and some shards in use
    (packed in index order, as Slurm fills them)."""
    nodes = []
    for i in range(draw(st.integers(1, 5))):
        whole = draw(st.integers(0, 4))
        shards = draw(st.integers(0, (4 - whole) * 4))
        on = tuple(range(-(-shards // 4)))
        idx = tuple(range(len(on), len(on) + whole))
        nodes.append(Node(f"node{i}", "mixed", gpus_total=4, gpus_alloc=whole, shards_total=16,
                          shards_alloc=shards, shard_gpus=on, whole_gpus=idx))  # fmt: skip
    return nodes


def _open_gpus(nodes: list[Node], submitted: dict[str, int]) -> int:
    return sum(-(-(n.shards_alloc + submitted.get(n.name, 0)) // 4) for n in nodes)


@settings(max_examples=200, deadline=None)
@given(shard_cluster(), st.integers(1, 12))
def test_one_shard_jobs_open_a_gpu_only_when_every_open_gpu_is_full(nodes: list[Node], jobs: int) -> None:
    """Packing's promise, on clusters Slurm filled in index order: a new GPU only when no GPU serving shards
    has one left, and no placement refused while a shard is free anywhere."""
    submitted: dict[str, int] = {}
    for _ in range(jobs):
        used = {n.name: n.shards_alloc + submitted.get(n.name, 0) for n in nodes}
        room_on_open = any(u % 4 for u in used.values())
        before = _open_gpus(nodes, submitted)
        choice = choose_shard_node(1, nodes, submitted=submitted)
        if choice is None:
            assert sum(4 - n.gpus_alloc for n in nodes) * 4 == sum(used.values())
            return
        submitted[choice.node] = submitted.get(choice.node, 0) + 1
        assert _open_gpus(nodes, submitted) == before + (0 if room_on_open else 1)
