"""Site config and policy loading: the shipped files, and one clear line for every kind of mistake."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from hpcserve.config import SiteConfig, check_policy, load_policy, load_site_config
from hpcserve.errors import ConfigError, ValidationError

ROOT = Path(__file__).resolve().parent.parent
MINI = ROOT / "site_configs" / "minicluster.yaml"
ONPREM = ROOT / "site_configs" / "example-onprem.yaml"
POLICY = ROOT / "policies" / "default.yaml"
DROP = object()  # as a value in an edit: delete the key


def edited(source: Path, tmp_path: Path, edits: dict[str, object]) -> Path:
    """A copy of ``source`` with dotted keys set (or dropped), written under tmp_path."""
    data = yaml.safe_load(source.read_text())
    for dotted, value in edits.items():
        *parents, last = dotted.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if value is DROP:
            del node[last]
        else:
            node[last] = copy.deepcopy(value)  # later edits may change it in place
    out = tmp_path / source.name
    out.write_text(yaml.safe_dump(data))
    return out


def config_error(load: Any, path: Path, field: str) -> str:
    """Load ``path``, expecting one ConfigError line that names the file and ``field`` and gives a fix."""
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {field}: " if field else f"{path}: ")
    assert "(fix: " in message
    return message


@pytest.mark.parametrize("path", [MINI, ONPREM])
def test_shipped_site_configs_fit_the_default_policy(path: Path) -> None:
    site = load_site_config(path)
    check_policy(load_policy(POLICY), site, POLICY)
    assert site.partition_names() == {"training": "train", "inference": "infer", "shared": "all"}


def test_minicluster_matches_the_local_cluster() -> None:
    site = load_site_config(MINI)
    assert site.cluster == "hpcmini"
    assert site.all_nodes() == tuple(f"node{i}" for i in range(1, 9))
    assert [site.gpus_of(n) for n in ("node1", "node8", "node9")] == [4, 4, 0]
    assert (site.gpu_type_of("node4"), site.gpu_type_of("node5")) == ("h100", "l40s")
    assert (site.leaf_of("node4"), site.leaf_of("node5"), site.leaf_of("node9")) == ("leaf1", "leaf2", None)
    fabric = site.fabric_of("node6")
    assert fabric is not None and fabric[0] == "roce" and fabric[1].gid_index == 3
    assert site.managed_pool.sides() == {"training": ("node3", "node4"), "inference": ("node5", "node6")}
    assert site.storage.warm is not None
    assert site.storage.warm.path_for("node2") == Path("/tmp/hpcserve-mc/local/node2/models")
    assert site.admins == ("root",)


def test_sqlite_url_expands_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    url = load_site_config(MINI).database_url()
    assert url == f"sqlite:///{tmp_path}/.local/state/hpcserve/hpcserve.db"
    assert load_site_config(ONPREM).database_url().startswith("postgresql+psycopg://")


def test_site_config_round_trips_through_dump() -> None:
    site = load_site_config(ONPREM)
    assert SiteConfig.model_validate(site.model_dump(mode="json")) == site


def test_default_policy_parses_times() -> None:
    policy = load_policy(POLICY)
    interactive = policy.for_class("interactive")
    assert (interactive.max_time_s, interactive.default_time_s) == (4 * 3600, 3600)
    assert policy.for_class("training").max_time_s == 3 * 86400
    assert policy.for_class("batch").preemptible
    with pytest.raises(ValidationError, match="unknown job class 'gpu'"):
        policy.for_class("gpu")


SITE_CASES = [
    pytest.param(
        {"nodes.0.gpu": 4}, "nodes.0.gpu", "valid fields here: names, gpus, gpu_type", id="unknown-field"
    ),
    pytest.param(
        {"nodes.1.gpus": "four"}, "nodes.1.gpus", "expected an integer, got 'four'", id="wrong-type"
    ),
    pytest.param(
        {"slurm.backend": "rest"}, "slurm.backend", "expected one of 'cli' or 'pyslurm'", id="literal"
    ),
    pytest.param(
        {"partitions.training": DROP}, "partitions.training", "add `training`", id="missing-partition"
    ),
    pytest.param(
        {"nodes.1.names": "node[4-8]"}, "nodes.1.names", "node4 already listed in nodes.0", id="dup-node"
    ),
    pytest.param({"nodes.0.names": "node[1-4"}, "nodes.0.names", "bad hostlist", id="bad-hostlist"),
    pytest.param(
        {"partitions.inference.nodes": "node[5-10]"},
        "partitions.inference.nodes",
        "unknown nodes: node[9-10]",
        id="partition-unknown-nodes",
    ),
    pytest.param(
        {"partitions.inference.nodes": "node[4-8]"},
        "partitions.inference.nodes",
        "node4 also in the training",
        id="partitions-overlap",
    ),
    pytest.param(
        {"managed_pool.training": "node[3-5]"},
        "managed_pool",
        "node5 is on both sides (fix: list each node under",
        id="pool-both-sides",
    ),
    pytest.param(
        {"managed_pool.inference": "node[4-6]", "managed_pool.training": "node3"},
        "managed_pool.inference",
        "node4 not in the inference partition (infer)",
        id="pool-wrong-side",
    ),
    pytest.param(
        {"switches.leaf1.nodes": "node[1-4,9]"},
        "switches.leaf1.nodes",
        "unknown nodes: node9",
        id="switch-node",
    ),
    pytest.param(
        {"switches.leaf2.nodes": "node[4-8]"},
        "switches.leaf2.nodes",
        "already under leaf leaf1",
        id="two-leaves",
    ),
    pytest.param(
        {"switches.spine.switches": ["leaf1", "leaf3"]}, "switches.spine.switches", "leaf3", id="child-switch"
    ),
    pytest.param(
        {"switches.spine.nodes": "node1"}, "switches.spine", "either nodes or switches", id="leaf-and-upper"
    ),
    pytest.param(
        {"switches.leaf2.fabric": "eth"}, "switches.leaf2.fabric", "unknown fabric 'eth'", id="leaf-fabric"
    ),
    pytest.param(
        {"fabrics.roce.gid_index": DROP}, "fabrics.roce.gid_index", "add `gid_index`", id="roce-gid"
    ),
    pytest.param({"fabrics.ib.hcas": []}, "fabrics.ib.hcas", "fabrics need HCAs", id="ib-no-hca"),
    pytest.param({"fabrics.roce.kind": "tcp"}, "fabrics.roce.hcas", "tcp fabric has no HCAs", id="tcp-hca"),
    pytest.param(
        {"storage.cold.path": "models"}, "storage.cold.path", "not an absolute path", id="relative-path"
    ),
    pytest.param({"database.url": "mysql://db/x"}, "database.url", "unsupported database URL", id="db-url"),
]


@pytest.mark.parametrize(("edits", "field", "expected"), SITE_CASES)
def test_bad_site_config(tmp_path: Path, edits: dict[str, object], field: str, expected: str) -> None:
    assert expected in config_error(load_site_config, edited(MINI, tmp_path, edits), field)


POLICY_CASES = [
    pytest.param(
        {"classes.batch.max_time": "UNLIMITED"},
        "classes.batch.max_time",
        "never submit --time=UNLIMITED: it blocks maintenance reservations (fix: give a finite limit",
        id="unlimited",
    ),
    pytest.param({"classes.batch.max_time": 43200}, "classes.batch.max_time", "quote it", id="unquoted-time"),
    pytest.param(
        {"classes.batch.max_time": "soon"}, "classes.batch.max_time", "not a Slurm duration", id="bad-time"
    ),
    pytest.param(
        {"classes.interactive.default_time": "05:00:00"},
        "classes.interactive.default_time",
        "longer than max_time",
        id="default-over-max",
    ),
    pytest.param(
        {"classes.training.max_gpus_per_user": 8},
        "classes.training.max_gpus_per_user",
        "at least 16",
        id="user-cap",
    ),
    pytest.param(
        {"classes.batch.max_gpus_per_job": 0}, "classes.batch.max_gpus_per_job", "replace 0", id="ge-1"
    ),
    pytest.param({"classes.interactive": DROP}, "classes", "add `classes.interactive`", id="missing-class"),
    pytest.param({"classes.gpu": {}}, "classes.gpu", "expected one of 'training'", id="unknown-class"),
]


@pytest.mark.parametrize(("edits", "field", "expected"), POLICY_CASES)
def test_bad_policy(tmp_path: Path, edits: dict[str, object], field: str, expected: str) -> None:
    assert expected in config_error(load_policy, edited(POLICY, tmp_path, edits), field)


def test_policy_partition_must_exist_in_site(tmp_path: Path) -> None:
    path = edited(POLICY, tmp_path, {"classes.batch.partition": "gpu"})
    with pytest.raises(ConfigError) as info:
        check_policy(load_policy(path), load_site_config(MINI), path)
    assert str(info.value) == (
        f"{path}: classes.batch.partition: partition 'gpu' is not in site 'minicluster' "
        "(fix: use one of the site's partitions: all, infer, train)"
    )


def test_several_errors_report_the_first_and_count_the_rest(tmp_path: Path) -> None:
    path = edited(MINI, tmp_path, {"nodes.0.gpus": -1, "nodes.1.gpus": "x", "admin": ["me"]})
    message = config_error(load_site_config, path, "nodes.0.gpus")
    assert "(+2 more)" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("name: [unclosed\n", "not valid YAML", id="malformed"),
        pytest.param("- node1\n", "the top level must be a mapping, got list", id="list"),
        pytest.param("", "the top level must be a mapping, got NoneType", id="empty"),
    ],
)
def test_unreadable_yaml(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    assert expected in config_error(load_site_config, path, "")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert "no such file" in config_error(load_policy, path, "")


# The minicluster config turned into lending through Slurm's preemption (LENDING=overlap in minicluster.sh).
OVERLAP: dict[str, object] = {
    "managed_pool": DROP,
    "partitions.training.nodes": "node[1-6]",
    "partitions.inference.nodes": "node[3-8]",
    "lending": {"mode": "overlap", "shared_nodes": "node[3-6]", "grace_time_s": 120},
}


def test_lending_defaults_to_overlap_unless_a_managed_pool_is_declared(tmp_path: Path) -> None:
    assert load_site_config(MINI).lending.mode == "moves"  # said so
    site = load_site_config(edited(MINI, tmp_path, OVERLAP))
    assert (site.lending.mode, site.lending.preempt) == ("overlap", "partition_prio")
    assert site.lending.shared_nodes == tuple(f"node{i}" for i in range(3, 7))
    check_policy(load_policy(POLICY), site, POLICY)
    unsaid = load_site_config(edited(MINI, tmp_path, {**OVERLAP, "lending": DROP}))
    assert (unsaid.lending.mode, unsaid.lending.shared_nodes) == ("overlap", site.lending.shared_nodes)
    pooled = load_site_config(edited(MINI, tmp_path, {"lending": DROP}))  # a managed pool, no mode: moves
    assert (pooled.lending.mode, pooled.lending.shared_nodes) == ("moves", ())
    apart = load_site_config(edited(MINI, tmp_path, {"lending": DROP, "managed_pool": DROP}))
    assert (apart.lending.mode, apart.managed_pool.sides()) == ("moves", {"training": (), "inference": ()})


LENDING_CASES = [
    pytest.param({"lending": {"mode": "steal"}}, "lending.mode", "'overlap' or 'moves'", id="mode"),
    pytest.param({"lending": {"shared_nodes": "node3"}}, "lending.shared_nodes", "mode: overlap", id="moves"),
    pytest.param({"managed_pool": DROP, "lending": {"mode": "overlap"}}, "lending.shared_nodes", "node[3-6]",
                 id="none"),
    pytest.param(
        {**OVERLAP, "partitions.training.nodes": "node[1-4]", "partitions.inference.nodes": "node[3-8]",
         "lending.shared_nodes": "node[3-6]"},
        "lending.shared_nodes", "node[5-6] not in the training partition (train)", id="outside",
    ),
    pytest.param(
        {**OVERLAP, "lending.shared_nodes": "node[3-4]"},
        "partitions.inference.nodes", "node[5-6] also in the training partition", id="undeclared-overlap",
    ),
    pytest.param(
        {**OVERLAP, "managed_pool": {"training": "node[1-2]"}}, "managed_pool", "moves no nodes", id="pool"
    ),
    pytest.param(
        {**OVERLAP, "lending.preempt": "qos"}, "lending.training_qos", "needs both QOS names", id="qos-names"
    ),
    pytest.param(
        {"lending": {"training_qos": "low"}}, "lending.training_qos", "set preempt: qos", id="qos-unused"
    ),
    pytest.param({"lending": {"tier": 20}}, "lending.tier", "", id="unknown-key"),
]  # fmt: skip


@pytest.mark.parametrize(("edits", "field", "expected"), LENDING_CASES)
def test_bad_lending(tmp_path: Path, edits: dict[str, object], field: str, expected: str) -> None:
    assert expected in config_error(load_site_config, edited(MINI, tmp_path, edits), field)


def test_grace_time_must_cover_the_training_class(tmp_path: Path) -> None:
    site = load_site_config(edited(MINI, tmp_path, {**OVERLAP, "lending.grace_time_s": 60}))
    with pytest.raises(ConfigError) as info:
        check_policy(load_policy(POLICY), site, POLICY)
    message = str(info.value)
    assert message.startswith(f"{POLICY}: classes.training.grace_s: 120 s is longer than the site's ")
    assert "(fix: lower grace_s to 60, or raise GraceTime in slurm.conf" in message
