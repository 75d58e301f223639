"""Placement: hand-made snapshots on the minicluster site config, then properties on random topologies
checked against brute force (fewest leaves, best fit, one island, usable nodes, determinism)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcserve.config import Fabric, SiteConfig, load_site_config
from hpcserve.placement import (
    UNMAPPED,
    FabricTopology,
    Placement,
    PlacementError,
    PlacementRequest,
    build_fabric_topology,
    first_fit,
    nccl_env,
    select_nodes,
    usable_for,
)
from hpcserve.slurm.models import ClusterSnapshot, Node, Switch, Topology
from hpcserve.slurm.parsers import parse_topology

ROOT = Path(__file__).resolve().parent.parent
MINI = load_site_config(ROOT / "site_configs" / "minicluster.yaml")
LIVE = parse_topology((ROOT / "tests" / "data" / "scontrol_topology.txt").read_text())
TOPO = build_fabric_topology(LIVE, MINI)
AT = datetime(2025, 1, 1, tzinfo=UTC)


def snapshot(nodes: Iterable[Node]) -> ClusterSnapshot:
    return ClusterSnapshot(at=AT, nodes=tuple(nodes), jobs=(), partitions=())


def mini(
    alloc: dict[int, int] | None = None, flags: dict[int, str] | None = None, down: Iterable[int] = ()
) -> ClusterSnapshot:
    """The 8 minicluster nodes (4 GPUs each) with GPUs allocated, flags set or nodes down by number."""
    alloc, flags, down = alloc or {}, flags or {}, set(down)

    def node(i: int) -> Node:
        used = alloc.get(i, 0)
        state = "down" if i in down else ("idle" if used == 0 else "mixed" if used < 4 else "allocated")
        marks = frozenset({flags[i]}) if i in flags else frozenset()
        return Node(f"node{i}", state, flags=marks, gpus_total=4, gpus_alloc=used)

    return snapshot(node(i) for i in range(1, 9))


def full(*numbers: int) -> dict[int, int]:
    return dict.fromkeys(numbers, 4)


# --- unit cases on the minicluster ---------------------------------------------------------------------


def test_two_nodes_fit_on_one_leaf_with_that_fabrics_env() -> None:
    placed = select_nodes(PlacementRequest(nodes=2, gpus_per_node=4), mini(), TOPO)
    assert placed.nodes == ("node1", "node2") and placed.leaves == ("leaf1",) and placed.fabric == "ib"
    assert placed.switches is None and placed.constraint is None
    assert dict(placed.env) == {
        "HPCSERVE_FABRIC": "ib",
        "NCCL_IB_DISABLE": "0",
        "NCCL_IB_HCA": "=mlx5_0,mlx5_1",
        "NCCL_SOCKET_IFNAME": "eth0",
        "GLOO_SOCKET_IFNAME": "eth0",
    }
    assert placed.reason == "2 nodes on leaf1 (ib); best fit: 2 free nodes left there"


def test_roce_leaf_gets_the_gid_index() -> None:
    placed = select_nodes(PlacementRequest(nodes=3, gpus_per_node=4), mini(full(1, 2)), TOPO)
    assert placed.leaves == ("leaf2",) and placed.nodes == ("node5", "node6", "node7")
    assert placed.env["NCCL_IB_GID_INDEX"] == "3" and placed.env["HPCSERVE_FABRIC"] == "roce"
    assert placed.env["NCCL_IB_HCA"] == "=mlx5_0"


def test_best_fit_picks_the_leaf_with_fewer_free_nodes() -> None:
    # leaf1: 3 free nodes, leaf2: 2 free nodes -> a 2-node job fills leaf2 and leaves leaf1's 3 whole
    placed = select_nodes(PlacementRequest(nodes=2, gpus_per_node=4), mini(full(1, 5, 6)), TOPO)
    assert placed.nodes == ("node7", "node8") and placed.leaves == ("leaf2",)
    assert placed.reason.endswith("best fit: 0 free nodes left there")


def test_best_fit_prefers_partly_used_nodes_for_small_jobs() -> None:
    # one GPU each: node3 (1 free GPU) and node6 (2 free) are the fullest nodes that still fit
    placed = select_nodes(PlacementRequest(nodes=1, gpus_per_node=1), mini({3: 3, 6: 2}), TOPO)
    assert placed.nodes == ("node3",)


def test_never_crosses_islands_even_when_that_fits_now() -> None:
    # 2 free nodes on each leaf: 4 fit now only across ib and roce, so the job waits for one leaf
    snap = mini(full(1, 2, 5, 6))
    placed = select_nodes(PlacementRequest(nodes=3, gpus_per_node=4, switch_wait_s=900), snap, TOPO)
    assert placed.nodes == () and not placed.fits_now
    assert placed.switches == "1@00:15:00" and placed.constraint == "ib" and placed.fabric == "ib"
    assert placed.env["HPCSERVE_FABRIC"] == "ib"
    assert "do not fit now" in placed.reason and "--constraint=ib" in placed.reason
    assert first_fit(PlacementRequest(nodes=3, gpus_per_node=4), snap, TOPO).fabric == "ib+roce"


def test_waiting_prefers_the_island_closer_to_fitting() -> None:
    placed = select_nodes(PlacementRequest(nodes=4, gpus_per_node=4), mini(full(1, 2, 5)), TOPO)
    assert placed.switches == "1@00:10:00" and placed.constraint == "roce"


def test_degraded_drained_and_down_nodes_are_skipped() -> None:
    snap = mini(flags={1: "DRAIN", 2: "NOT_RESPONDING"}, down=[3])
    request = PlacementRequest(nodes=2, gpus_per_node=4, degraded=frozenset({"node5"}))
    placed = select_nodes(request, snap, TOPO)
    assert placed.nodes == ("node6", "node7") and placed.leaves == ("leaf2",)
    one = select_nodes(PlacementRequest(nodes=1, gpus_per_node=4), snap, TOPO)
    assert one.nodes == ("node4",)  # leaf1's last usable node is the best fit for one node


def test_candidates_limit_the_choice() -> None:
    request = PlacementRequest(nodes=2, gpus_per_node=2, candidates=frozenset({"node3", "node7", "node8"}))
    assert select_nodes(request, mini(), TOPO).nodes == ("node7", "node8")


def test_too_big_for_any_island_is_an_error_naming_the_fix() -> None:
    with pytest.raises(PlacementError) as info:
        select_nodes(PlacementRequest(nodes=6, gpus_per_node=4), mini(), TOPO)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot place 6 nodes x 4 GPUs in one fabric island")
    assert "ib has 4, roce has 4 such nodes" in message and message.endswith("ask for at most 4 nodes")


def test_too_big_counts_only_eligible_nodes() -> None:
    request = PlacementRequest(nodes=4, gpus_per_node=4, degraded=frozenset({"node1", "node8"}))
    with pytest.raises(PlacementError, match="ib has 3, roce has 3 such nodes; ask for at most 3 nodes"):
        select_nodes(request, mini(), TOPO)


def test_no_candidate_with_enough_gpus_is_an_error() -> None:
    with pytest.raises(PlacementError, match=r"no candidate node .* has 8 GPUs .* at most 4 GPUs each"):
        select_nodes(PlacementRequest(nodes=2, gpus_per_node=8), mini(), TOPO)
    with pytest.raises(PlacementError, match="0 candidates"):
        select_nodes(PlacementRequest(nodes=1, candidates=frozenset()), mini(), TOPO)


def test_bad_request_values_are_errors() -> None:
    with pytest.raises(PlacementError, match="ask for 1 node or more"):
        PlacementRequest(nodes=0)


def test_cpu_only_jobs_are_placed_by_the_same_rules() -> None:
    placed = select_nodes(PlacementRequest(nodes=2), mini(full(1, 2, 3, 4, 5)), TOPO)
    assert placed.leaves == ("leaf1",) and placed.nodes == ("node1", "node2")  # fullest nodes first


def test_multi_leaf_when_one_leaf_is_too_small() -> None:
    site = site_config([("ib", ["a1", "a2"]), ("ib", ["b1", "b2", "b3"]), ("ib", ["c1"])], {"ib": IB})
    topo = build_fabric_topology(Topology(), site)
    nodes = [Node(name, "idle", gpus_total=8) for name in ("a1", "a2", "b1", "b2", "b3", "c1")]
    placed = select_nodes(PlacementRequest(nodes=4, gpus_per_node=8), snapshot(nodes), topo)
    # no leaf holds 4, so two leaves: leaf2+leaf3 hold exactly 4, less than leaf1+leaf2 (5)
    assert placed.leaves == ("leaf2", "leaf3") and placed.nodes == ("b1", "b2", "b3", "c1")
    assert "the fewest leaf switches that fit now" in placed.reason


def test_nccl_env_per_fabric_kind() -> None:
    assert nccl_env(Fabric(kind="tcp", socket_ifname="eth1"), "eth") == {
        "HPCSERVE_FABRIC": "eth",
        "NCCL_IB_DISABLE": "1",
        "NCCL_SOCKET_IFNAME": "eth1",
        "GLOO_SOCKET_IFNAME": "eth1",
    }
    roce = nccl_env(MINI.fabrics["roce"], "roce")
    assert roce["NCCL_IB_GID_INDEX"] == "3" and roce["NCCL_IB_DISABLE"] == "0"
    assert "NCCL_IB_GID_INDEX" not in nccl_env(MINI.fabrics["ib"], "ib")
    assert nccl_env(Fabric(kind="tcp"), "x") == {"HPCSERVE_FABRIC": "x", "NCCL_IB_DISABLE": "1"}


def test_fabric_topology_from_live_and_site() -> None:
    assert dict(TOPO.leaves) == {
        "leaf1": tuple(f"node{i}" for i in range(1, 5)),
        "leaf2": LIVE.leaves[1].nodes,
    }
    assert TOPO.islands() == {"ib": ("leaf1",), "roce": ("leaf2",)}
    assert TOPO.fabric("roce").feature == "roce"
    # no live topology: the site's switches; a live leaf the site does not name takes its nodes' fabric
    assert build_fabric_topology(Topology(), MINI).node_leaf == TOPO.node_leaf
    live = Topology((Switch("s9", 0, nodes=("node5", "node6")), Switch("s10", 0, nodes=("node4", "node9"))))
    mixed = build_fabric_topology(live, MINI)
    assert mixed.leaf_of("node5") == "s9" and mixed.island_of("s9") == "roce"
    assert mixed.leaf_of("node7") == "leaf2" and mixed.island_of("s10") == UNMAPPED
    assert mixed.leaf_of("node42") == "node42" and mixed.fabric(UNMAPPED).kind == "tcp"


def test_nodes_outside_any_leaf_form_a_tcp_island_of_one_node_leaves() -> None:
    nodes = [Node(f"x{i}", "idle", gpus_total=4) for i in range(3)]
    placed = select_nodes(PlacementRequest(nodes=2, gpus_per_node=4), snapshot(nodes), TOPO)
    assert placed.fabric == UNMAPPED and placed.leaves == ("x0", "x1")
    assert placed.env["NCCL_IB_DISABLE"] == "1"


def test_shipped_site_configs_name_a_feature_per_fabric() -> None:
    onprem = load_site_config(ROOT / "site_configs" / "example-onprem.yaml")
    for site in (MINI, onprem):
        assert {name: fabric.feature for name, fabric in site.fabrics.items()} == {"ib": "ib", "roce": "roce"}


# --- properties on random topologies ---------------------------------------------------------------------

IB = Fabric(kind="infiniband", hcas=("mlx5_0",), socket_ifname="ib0")
FABRICS = {
    "infiniband": IB,
    "roce": Fabric(kind="roce", hcas=("mlx5_0",), gid_index=3),
    "tcp": Fabric(kind="tcp", socket_ifname="eth0"),
}


def site_config(
    leaves: list[tuple[str, list[str]]], fabrics: dict[str, Fabric], loose: Iterable[str] = ()
) -> SiteConfig:
    """A minimal valid site: leaf{i} switches with (fabric, nodes), plus nodes under no switch."""
    names = [name for _, members in leaves for name in members] + list(loose)
    return SiteConfig.model_validate(
        {
            "name": "random",
            "cluster": "random",
            "nodes": [{"names": names, "gpus": 8}],
            "partitions": {
                "training": {"name": "t", "nodes": names},
                "inference": {"name": "i", "nodes": []},
            },
            "fabrics": {name: fabric.model_dump() for name, fabric in fabrics.items()},
            "switches": {f"leaf{i + 1}": {"nodes": m, "fabric": f} for i, (f, m) in enumerate(leaves)},
            "storage": {"cold": {"path": "/shared"}},
        }
    )


@st.composite
def nodes_st(draw: st.DrawFn, name: str) -> Node:
    total = draw(st.sampled_from([0, 4, 8, 8]))
    used = draw(st.sampled_from([0, 0, total, draw(st.integers(0, total))]))
    state = draw(st.sampled_from(["idle", "idle", "mixed", "allocated", "down"]))
    flags = draw(st.sampled_from([frozenset(), frozenset(), frozenset(), frozenset({"DRAIN"})]))
    return Node(name, state, flags=flags, gpus_total=total, gpus_alloc=used)


@st.composite
def clusters(draw: st.DrawFn) -> tuple[FabricTopology, ClusterSnapshot]:
    """1-3 islands of 1-4 leaves of 1-4 nodes, 0-2 nodes under no leaf, random states and allocations."""
    fabrics: dict[str, Fabric] = {}
    leaves: list[tuple[str, list[str]]] = []
    for island in range(draw(st.integers(1, 3))):
        base = FABRICS[draw(st.sampled_from(sorted(FABRICS)))]
        feature = f"f{island}" if draw(st.booleans()) else None
        fabrics[f"fab{island}"] = base.model_copy(update={"feature": feature})
        for _ in range(draw(st.integers(1, 4))):
            leaves.append((f"fab{island}", [f"n{len(leaves)}x{k}" for k in range(draw(st.integers(1, 4)))]))
    loose = [f"loose{k}" for k in range(draw(st.integers(0, 2)))]
    live_leaves = draw(st.booleans())  # where the live topology has the leaves or leaves it to the site
    site = site_config(leaves, fabrics, loose)
    live = Topology(tuple(Switch(f"leaf{i + 1}", 0, nodes=tuple(m)) for i, (_, m) in enumerate(leaves)))
    topology = build_fabric_topology(live if live_leaves else Topology(), site)
    nodes = [draw(nodes_st(name)) for name in site.all_nodes()]
    return topology, snapshot(draw(st.permutations(nodes)))


@st.composite
def requests(draw: st.DrawFn, names: list[str]) -> PlacementRequest:
    some = st.frozensets(st.sampled_from(names), min_size=len(names) // 2)
    return PlacementRequest(
        nodes=draw(st.integers(1, 5)),
        gpus_per_node=draw(st.sampled_from([0, 1, 4, 8])),
        candidates=draw(st.none() | st.none() | some),
        degraded=draw(st.frozensets(st.sampled_from(names), max_size=2)),
    )


def leaf_counts(nodes: Iterable[Node], topology: FabricTopology) -> dict[str, dict[str, list[Node]]]:
    """Island -> leaf -> nodes, computed here independently of the code under test."""
    found: dict[str, dict[str, list[Node]]] = {}
    for node in nodes:
        leaf = topology.leaf_of(node.name)
        found.setdefault(topology.island_of(leaf), {}).setdefault(leaf, []).append(node)
    return found


def brute_min_leaves(leaves: dict[str, list[Node]], need: int) -> tuple[int, int] | None:
    """(fewest leaves holding ``need`` nodes, least free GPUs among such sets), by trying every subset."""
    groups = list(leaves.values())
    for size in range(1, len(groups) + 1):
        fits = [c for c in itertools.combinations(groups, size) if sum(map(len, c)) >= need]
        if fits:
            return size, min(sum(n.gpus_free for g in c for n in g) for c in fits)
    return None


def eligible(node: Node, request: PlacementRequest) -> bool:
    in_pool = request.candidates is None or node.name in request.candidates
    return in_pool and node.name not in request.degraded and node.gpus_total >= request.gpus_per_node


def check_placed(
    placed: Placement, request: PlacementRequest, snap: ClusterSnapshot, topo: FabricTopology
) -> None:
    by_name = {node.name: node for node in snap.nodes}
    chosen = [by_name[name] for name in placed.nodes]
    assert len(set(placed.nodes)) == len(placed.nodes) == request.nodes
    assert all(usable_for(node, request) and eligible(node, request) and node.available for node in chosen)
    assert all(node.gpus_total - node.gpus_alloc >= request.gpus_per_node for node in chosen)
    assert {topo.island_of(topo.leaf_of(name)) for name in placed.nodes} == {placed.fabric}
    assert set(placed.leaves) == {topo.leaf_of(name) for name in placed.nodes}
    usable = leaf_counts((n for n in snap.nodes if usable_for(n, request)), topo)
    best = min(b for leaves in usable.values() if (b := brute_min_leaves(leaves, request.nodes)))
    assert len(placed.leaves) == best[0]  # the fewest leaves over every island
    if best[0] == 1:  # best fit over every leaf: fullest nodes taken, then the smallest free group
        options = [fit_key(nodes, request.nodes) for leaves in usable.values() for nodes in leaves.values()]
        leaf = usable[placed.fabric][placed.leaves[0]]
        assert fit_key(leaf, request.nodes) == min(k for k in options if k is not None)
        assert sorted(n.gpus_free for n in chosen) == sorted(n.gpus_free for n in leaf)[: request.nodes]
    else:  # within its island no set of that many leaves holds less free capacity
        free = sum(n.gpus_free for leaf in placed.leaves for n in usable[placed.fabric][leaf])
        assert brute_min_leaves(usable[placed.fabric], request.nodes) == (best[0], free)
    assert placed.env["HPCSERVE_FABRIC"] == placed.fabric and placed.switches is None


def fit_key(nodes: list[Node], need: int) -> tuple[int, int] | None:
    """(free GPUs on the ``need`` fullest nodes, free GPUs on all): one leaf's best-fit key."""
    free = sorted(node.gpus_free for node in nodes)
    return (sum(free[:need]), sum(free)) if len(nodes) >= need else None


def check_unplaced(
    outcome: Placement | str, request: PlacementRequest, snap: ClusterSnapshot, topo: FabricTopology
) -> None:
    usable = leaf_counts((n for n in snap.nodes if usable_for(n, request)), topo)
    assert all(brute_min_leaves(leaves, request.nodes) is None for leaves in usable.values())
    total = leaf_counts((n for n in snap.nodes if eligible(n, request)), topo)
    fits = {island: b for island, leaves in total.items() if (b := brute_min_leaves(leaves, request.nodes))}
    if isinstance(outcome, str):
        assert not fits and outcome.startswith(f"cannot place {request.describe()}")
        return
    assert outcome.fabric in fits and outcome.switches == f"{fits[outcome.fabric][0]}@00:10:00"
    assert outcome.constraint == topo.fabric(outcome.fabric).feature
    if any(topo.fabric(island).feature for island in fits):
        assert outcome.constraint is not None  # pinned whenever some fitting island can be


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_select_nodes_properties_on_random_topologies(data: st.DataObject) -> None:
    topo, snap = data.draw(clusters())
    request = data.draw(requests([node.name for node in snap.nodes]))
    try:
        placed = select_nodes(request, snap, topo)
    except PlacementError as err:
        check_unplaced(str(err), request, snap, topo)
        return
    if placed.fits_now:
        check_placed(placed, request, snap, topo)
    else:
        check_unplaced(placed, request, snap, topo)
    shuffled = snapshot(data.draw(st.permutations(snap.nodes)))
    assert select_nodes(request, shuffled, topo) == placed  # deterministic, whatever the node order
