"""NCCL/RDMA-aware node selection: few leaf switches, one fabric island, best fit; and the fabric's NCCL env.

Pure decisions over a ``ClusterSnapshot`` and a ``FabricTopology`` (Slurm's live leaves joined with the
site's fabric map); nothing here runs Slurm or reads a file.
"""

from hpcserve.placement.fabric import UNMAPPED, FabricTopology, build_fabric_topology, natural_key
from hpcserve.placement.nccl import nccl_env
from hpcserve.placement.select import (
    Placement,
    PlacementError,
    PlacementRequest,
    clock,
    first_fit,
    select_nodes,
    usable_for,
)

__all__ = [
    "UNMAPPED",
    "FabricTopology",
    "Placement",
    "PlacementError",
    "PlacementRequest",
    "build_fabric_topology",
    "clock",
    "first_fit",
    "natural_key",
    "nccl_env",
    "select_nodes",
    "usable_for",
]
