"""From what the controller loaded to the autoscaler's ``Observation``, and back to a replica count."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

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
) -> tuple[int, ScalerState]:
    """The desired replica count for this tick, and the autoscaler's state to keep for the next one."""
    spec = DeploymentSpec.model_validate(deployment.spec)
    decision, state = decide(spec, observe(replicas, stats, gateway_waiting), state or ScalerState(), now)
    return decision.replicas, state
