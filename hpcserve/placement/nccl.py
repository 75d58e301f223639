"""The environment a multi-node job needs to use its fabric: NCCL's variables, plus gloo's interface.

NCCL reads (names as in NCCL's environment variable documentation):
- ``NCCL_IB_DISABLE``: 1 makes NCCL use TCP sockets instead of InfiniBand/RoCE verbs;
- ``NCCL_IB_HCA``: the HCAs to use; a leading ``=`` makes the names exact, so mlx5_1 does not also match
  mlx5_10 and mlx5_11;
- ``NCCL_IB_GID_INDEX``: RoCE only, the GID table entry (3 is RoCE v2 over IPv4 on most sites);
- ``NCCL_SOCKET_IFNAME``: the interface for bootstrap (and data when IB is disabled), as the site writes it.
torch's gloo backend (the local cluster's, which has no GPUs to run NCCL) reads ``GLOO_SOCKET_IFNAME``.
``HPCSERVE_FABRIC`` names the fabric, for the job's own logs.
"""

from __future__ import annotations

from hpcserve.config.sections import Fabric


def nccl_env(fabric: Fabric, name: str) -> dict[str, str]:
    """Environment variables for a job whose nodes all sit on ``fabric`` (called ``name`` in the site)."""
    env = {"HPCSERVE_FABRIC": name, "NCCL_IB_DISABLE": "1" if fabric.kind == "tcp" else "0"}
    if fabric.kind != "tcp" and fabric.hcas:
        env["NCCL_IB_HCA"] = "=" + ",".join(fabric.hcas)
    if fabric.kind == "roce" and fabric.gid_index is not None:
        env["NCCL_IB_GID_INDEX"] = str(fabric.gid_index)
    if fabric.socket_ifname:
        env["NCCL_SOCKET_IFNAME"] = fabric.socket_ifname
        env["GLOO_SOCKET_IFNAME"] = fabric.socket_ifname
    return env
