"""From what the controller loaded to the autoscaler's ``Observation``, and back to a replica count; the
owner's GPU limit on every scale-up; and the autoscaler's state as the service keeps it between ticks (in
the database, ``service_state`` ``scaler:<deployment>``, so a restarted or standby service goes on from it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec

from hpcserve.serving.autoscaler import Observation, ReplicaLoad, ScalerState, decide
from hpcserve.serving.reconciler import ReplicaState
from hpcserve.serving.spec import DeploymentSpec

if TYPE_CHECKING:
    from hpcserve.serving.engine_stats import EngineStats
    from hpcserve.store import Deployment, Replica


def observe(
    replicas: Sequence[Replica], stats: Mapping[int, EngineStats], gateway_waiting: int
) -> Observation:
    loads = []
    for replica in replicas:
        if replica.state not in {s.value for s in ReplicaState}:
            continue
        s = stats.get(replica.index)
        waiting, running = (s.waiting or 0, s.running or 0) if s else (0, 0)
        loads.append(
            ReplicaLoad(replica.index, ReplicaState(replica.state), waiting, running, waiting + running)
        )
    return Observation(tuple(loads), gateway_waiting)


def autoscale(
    deployment: Deployment,
    replicas: Sequence[Replica],
    stats: Mapping[int, EngineStats],
    gateway_waiting: int,
    state: ScalerState | None,
    now: datetime,
    floor: int = 0,
) -> tuple[int, ScalerState]:
    """The desired replica count for this tick, and the autoscaler's state to keep for the next one;
    ``floor``: the pre-warm forecast's (``lending: overlap``), 0 for none."""
    spec = DeploymentSpec.model_validate(deployment.spec)
    obs = observe(replicas, stats, gateway_waiting)
    decision, state = decide(spec, obs, state or ScalerState(), now, floor)
    return decision.replicas, state


STATE_PREFIX = "scaler:"


def state_name(deployment: str) -> str:
    """The deployment's autoscaler state in ``service_state``."""
    return f"{STATE_PREFIX}{deployment}"


class ScalerRecord(msgspec.Struct, frozen=True):
    """What the service keeps of a deployment's autoscaler: its state, and why the last scale-up was capped
    (None when it was not), for ``hpcserve deployments`` to show."""

    state: ScalerState = msgspec.field(default_factory=ScalerState)
    capped: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(msgspec.to_builtins(self))

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> ScalerRecord:
        """The stored record; a fresh one when there is none or it no longer decodes (a changed type)."""
        if data is None:
            return cls()
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError:
            return cls()


@dataclass(frozen=True, slots=True)
class GpuLimit:
    """The owner's limits in the policy's inference class, and the GPUs they hold or wait for now (all
    their Slurm jobs, as the policy counts them, GPU shards as parts of a GPU, plus what this tick already
    submitted)."""

    per_user: int
    per_job: int
    used: float
    user: str


def cap_scale_up(
    desired: int, current: int, gpus_per_replica: float, limit: GpuLimit
) -> tuple[int, str | None]:
    """``desired`` replicas, lowered so the replicas to add keep the owner within their GPU limits, and why
    (None when nothing was lowered). Scaling down, or holding, is never capped. A replica on part of a
    GPU counts as that part (``jobs.policy.part_gpus``: 0.25 for a quarter of a GPU)."""
    if desired <= current:
        return desired, None
    if gpus_per_replica > limit.per_job:
        return current, (
            f"max_gpus_per_job: a replica takes {gpus_per_replica:g} GPUs, the limit is {limit.per_job}"
        )
    room = (
        max(0, int((limit.per_user - limit.used) / gpus_per_replica + 1e-9)) if gpus_per_replica else desired
    )
    allowed = current + room
    if desired <= allowed:
        return desired, None
    return allowed, (
        f"max_gpus_per_user: {limit.user} holds or waits for {limit.used:g} of {limit.per_user} GPUs; "
        f"{desired} replicas wanted, {allowed} fit"
    )
