"""The cluster snapshot types, now in ``hpcserve.model.cluster`` (pure, no I/O); re-exported here so the
old import path keeps working. New code imports from ``hpcserve.model``."""

from hpcserve.model.cluster import (
    TAG_PREFIX,
    UNAVAILABLE_FLAGS,
    AccountingRecord,
    ClusterSnapshot,
    Job,
    JobState,
    Node,
    Partition,
    Switch,
    Topology,
    tag_of,
    wait_of,
    with_switches,
)

__all__ = [
    "TAG_PREFIX",
    "UNAVAILABLE_FLAGS",
    "AccountingRecord",
    "ClusterSnapshot",
    "Job",
    "JobState",
    "Node",
    "Partition",
    "Switch",
    "Topology",
    "tag_of",
    "wait_of",
    "with_switches",
]
