"""Which NVML devices a job sees: ``CUDA_VISIBLE_DEVICES`` mapped to NVML indices or UUIDs. Pure.

The variable is read as CUDA reads it:

- unset: every device, in NVML's order;
- set but empty (or Slurm's ``NoDevFiles``): none;
- a comma-separated list of entries, each an index (``0``), a GPU UUID (``GPU-8f3c...``, or a unique prefix of
  one) or a MIG device UUID (``MIG-...``, looked up by NVML itself). CUDA stops at the first entry it cannot
  use (unknown, ambiguous or repeated) and ignores it and everything after; so does this.

Indices are NVML's (PCI bus order), which is what Slurm writes for a GRES with ``File=`` devices in bus order
(``AutoDetect=nvml`` too). A job's ``gpu_index`` is the entry's position in the list: what the job's own
``cuda:N`` means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ENV = "CUDA_VISIBLE_DEVICES"
_NONE = frozenset({"", "NoDevFiles", "none", "void"})


@dataclass(frozen=True, slots=True)
class VisibleDevice:
    """One device the job sees: its position (``gpu_index``) and how NVML finds it. ``nvml_index`` is None
    for a MIG device, which NVML finds only by ``uuid``."""

    gpu_index: int
    nvml_index: int | None
    uuid: str


@dataclass(frozen=True, slots=True)
class Visibility:
    """The devices the job sees, and the entry CUDA would stop at (None: every entry was used)."""

    devices: tuple[VisibleDevice, ...]
    stopped_at: str | None = None


def visible_devices(value: str | None, uuids: Sequence[str]) -> Visibility:
    """The devices ``CUDA_VISIBLE_DEVICES=value`` shows, given NVML's device UUIDs by NVML index."""
    if value is None:
        return Visibility(tuple(VisibleDevice(i, i, uuid) for i, uuid in enumerate(uuids)))
    if value.strip() in _NONE:
        return Visibility(())
    found: list[VisibleDevice] = []
    for entry in (part.strip() for part in value.split(",")):
        device = _resolve(entry, len(found), uuids)
        if device is None or any(device.uuid == seen.uuid for seen in found):
            return Visibility(tuple(found), entry)
        found.append(device)
    return Visibility(tuple(found))


def _resolve(entry: str, position: int, uuids: Sequence[str]) -> VisibleDevice | None:
    if entry.isdigit():
        index = int(entry)
        return VisibleDevice(position, index, uuids[index]) if index < len(uuids) else None
    if entry.startswith("MIG-"):
        return VisibleDevice(position, None, entry)
    if entry.startswith("GPU-") and len(entry) > len("GPU-"):
        matches = [i for i, uuid in enumerate(uuids) if uuid.startswith(entry)]
        return VisibleDevice(position, matches[0], uuids[matches[0]]) if len(matches) == 1 else None
    return None


_SLURM_GPU_VARS = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE")


def job_sees_gpus(environ: Mapping[str, str]) -> bool:
    """Whether to sample at all. Outside Slurm, yes (an admin's look at a node). Inside a job, only when it
    was given GPUs (``CUDA_VISIBLE_DEVICES`` or Slurm's GPU variables): with the variable unset, CUDA (and
    the sampler) would see every GPU of the node, which belong to other jobs."""
    if "SLURM_JOB_ID" not in environ or ENV in environ:
        return True
    return any(environ.get(name, "") not in ("", "0") for name in _SLURM_GPU_VARS)
