"""The lending check, pure: recorded ``scontrol show config`` / ``show partition -o`` / ``sacctmgr show qos``
output against the site config's ``lending`` section; every mismatch named with its fix."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

from hpcserve.config import load_site_config
from hpcserve.config.lending import Mismatch, lending_mismatches, summary
from hpcserve.config.site import SiteConfig
from hpcserve.slurm.preempt_conf import (
    LiveSlurm,
    live_slurm,
    parse_partition_preempt,
    parse_qos,
    parse_show_config,
)
from tests.test_config import MINI, OVERLAP, ROOT, edited

DATA = Path(__file__).parent / "data"
CONFIG = (DATA / "scontrol_config.txt").read_text()
PARTITIONS = (
    DATA / "scontrol_partitions.txt"
).read_text()  # today's layout: train node[1-4], infer node[5-8]
OVERLAPPING = (DATA / "scontrol_partitions_overlap.txt").read_text()  # what LENDING=overlap would show
QOS = (DATA / "sacctmgr_qos.txt").read_text()
RECONF = "in slurm.conf, then scontrol reconfigure"
ON_TRAIN, ON_INFER = f"on PartitionName=train {RECONF}", f"on PartitionName=infer {RECONF}"


def overlap_site(tmp_path: Path, **lending: object) -> SiteConfig:
    edits = {**OVERLAP, **{f"lending.{key}": value for key, value in lending.items()}}
    return load_site_config(edited(MINI, tmp_path, edits))


def lines(found: list[Mismatch]) -> list[str]:
    return [f"{m.problem} (fix: {m.fix})" for m in found]


def test_parsers_read_the_recorded_output() -> None:
    config = parse_show_config(CONFIG)
    assert (config["PreemptType"], config["PreemptMode"], config["ClusterName"]) == (
        "preempt/partition_prio", "REQUEUE", "hpcmini",
    )  # fmt: skip
    parts = parse_partition_preempt(PARTITIONS)
    assert list(parts) == ["train", "infer", "all"]
    train = parts["train"]
    assert (train.nodes, train.priority_tier, train.preempt_mode, train.grace_time_s, train.qos) == (
        ("node1", "node2", "node3", "node4"), 10, "REQUEUE", 0, "N/A",
    )  # fmt: skip
    assert parse_partition_preempt(OVERLAPPING)["train"].grace_time_s == 120
    normal = parse_qos(QOS)["normal"]
    assert (normal.preempt, normal.preempt_mode, normal.grace_time_s) == ((), "cluster", 0)
    assert parse_qos("low||requeue|00:02:00\nhigh|low|cluster|00:00:00\n")["high"].preempt == ("low",)


def test_todays_layout_passes_moves_and_names_each_overlap_mismatch(tmp_path: Path) -> None:
    live = live_slurm(CONFIG, PARTITIONS)
    assert lending_mismatches(load_site_config(MINI), live) == []
    assert lines(lending_mismatches(overlap_site(tmp_path), live)) == [
        f"partition train has GraceTime=0, not lending.grace_time_s (120) (fix: GraceTime=120 on "
        f"PartitionName=train {RECONF})",
        f"partition train lacks node[5-6] of lending.shared_nodes (fix: Nodes=node[1-6] {ON_TRAIN})",
        f"partition infer lacks node[3-4] of lending.shared_nodes (fix: Nodes=node[3-8] {ON_INFER})",
        f"partition infer has PriorityTier=10, not above train's 10 (fix: PriorityTier=20 on "
        f"PartitionName=infer {RECONF})",
    ]


def test_the_overlapping_layout_passes(tmp_path: Path) -> None:
    site = overlap_site(tmp_path)
    assert lending_mismatches(site, live_slurm(CONFIG, OVERLAPPING)) == []
    assert summary(site) == (
        "mode overlap: infer preempts train on node[3-6] (PriorityTier), REQUEUE, GraceTime 120 s"
    )


def test_cluster_wide_settings(tmp_path: Path) -> None:
    parts = parse_partition_preempt(OVERLAPPING)
    live = LiveSlurm("preempt/none", "OFF", parts)
    assert lines(lending_mismatches(overlap_site(tmp_path), live)) == [
        "PreemptType is preempt/none, not preempt/partition_prio (fix: PreemptType=preempt/partition_prio "
        "in slurm.conf, then restart slurmctld)",
        "PreemptMode is OFF, not REQUEUE (fix: PreemptMode=REQUEUE in slurm.conf, then restart slurmctld)",
    ]
    cancel = dataclasses.replace(parts["train"], preempt_mode="CANCEL")
    live = LiveSlurm("preempt/partition_prio", "REQUEUE", {**parts, "train": cancel})
    assert lines(lending_mismatches(overlap_site(tmp_path), live)) == [
        f"partition train has PreemptMode=CANCEL, not REQUEUE (fix: PreemptMode=REQUEUE {ON_TRAIN})"
    ]


def test_missing_partitions_are_named_first(tmp_path: Path) -> None:
    only_all = "\n".join(line for line in PARTITIONS.splitlines() if line.startswith("PartitionName=all"))
    found = lines(lending_mismatches(overlap_site(tmp_path), live_slurm(CONFIG, only_all)))
    assert found == [
        f"partition train is not in Slurm (fix: add PartitionName=train {RECONF})",
        f"partition infer is not in Slurm (fix: add PartitionName=infer {RECONF})",
    ]


def test_qos_preemption(tmp_path: Path) -> None:
    site = overlap_site(tmp_path, preempt="qos", training_qos="low", inference_qos="high")
    config = CONFIG.replace("preempt/partition_prio", "preempt/qos")
    absent = lines(lending_mismatches(site, live_slurm(config, OVERLAPPING, QOS)))
    assert absent == ["QOS low is not in slurmdbd (fix: sacctmgr add qos low)",
                      "QOS high is not in slurmdbd (fix: sacctmgr add qos high)"]  # fmt: skip
    wrong = QOS + "low||cancel|00:00:30\nhigh|normal|cluster|00:00:00\n"
    assert lines(lending_mismatches(site, live_slurm(config, OVERLAPPING, wrong))) == [
        "QOS high has Preempt=normal, without low (fix: sacctmgr modify qos high set Preempt+=low)",
        "QOS low has PreemptMode=cancel, not REQUEUE (fix: sacctmgr modify qos low set PreemptMode=requeue)",
        "QOS low has GraceTime=30, not lending.grace_time_s (120) (fix: sacctmgr modify qos low set "
        "GraceTime=120)",
    ]
    right = QOS + "low||cluster|00:02:00\nhigh|low|cluster|00:00:00\n"
    assert lending_mismatches(site, live_slurm(config, OVERLAPPING, right)) == []
    assert "(QOS high)" in summary(site)


def test_moves_names_pool_nodes_out_of_place() -> None:
    site = load_site_config(MINI)
    moved = PARTITIONS.replace("Nodes=node[1-4]", "Nodes=node[1,3-4]")
    moved = moved.replace("Nodes=node[5-8]", "Nodes=node[4-8]")
    found = lines(lending_mismatches(site, live_slurm(CONFIG, moved)))
    assert found[0].startswith("managed_pool node node4 is in both train and infer (fix: keep it in one: ")
    assert found[1] == (
        f"partition train lacks node2 of partitions.training.nodes (fix: Nodes=node[1-4] {ON_TRAIN})"
    )
    assert len(found) == 2
    assert summary(site) == "mode moves: managed pool node[3-6] in train/infer as declared"


def test_the_overlap_knob_of_minicluster_sh_matches_the_documented_site_config(tmp_path: Path) -> None:
    """LENDING=overlap scripts/minicluster.sh writes partitions that the documented overlap config accepts
    (slurm.conf lines are Key=Value like scontrol's; an unset GraceTime reads as 0, as Slurm shows it)."""
    overlap, moves = script_partitions("overlap"), script_partitions("moves")
    assert lending_mismatches(overlap_site(tmp_path), live_slurm(CONFIG, overlap)) == []
    assert lending_mismatches(load_site_config(MINI), live_slurm(CONFIG, moves)) == []
    assert lending_mismatches(overlap_site(tmp_path), live_slurm(CONFIG, moves))


def script_partitions(lending: str) -> str:
    argv = ["bash", str(ROOT / "scripts" / "minicluster.sh"), "partitions"]
    env = {**os.environ, "LENDING": lending, "NNODES": "8"}
    return subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("grace", [0, 300])
def test_grace_must_match_exactly(tmp_path: Path, grace: int) -> None:
    found = lending_mismatches(overlap_site(tmp_path, grace_time_s=grace), live_slurm(CONFIG, OVERLAPPING))
    assert [m.fix for m in found] == [f"GraceTime={grace} on PartitionName=train {RECONF}"]


def test_example_onprem_overlap_example_is_valid(tmp_path: Path) -> None:
    onprem = ROOT / "site_configs" / "example-onprem.yaml"
    edits: dict[str, object] = {"managed_pool": {}, "partitions.training.nodes": "gpu[001-048]",
             "partitions.inference.nodes": "gpu[033-064]",
             "lending": {"mode": "overlap", "shared_nodes": "gpu[033-048]", "grace_time_s": 120}}  # fmt: skip
    assert load_site_config(edited(onprem, tmp_path, edits)).lending.mode == "overlap"
