"""A replay's fixed inputs: the site's nodes and sides, both workloads scaled to it, and the settings.

``build_scenario`` is pure (site, policy and parsed traces in, ``Scenario`` out); ``load_scenario`` reads
the two trace files first. Every policy of one comparison runs on the same ``Scenario``.

Inference scaling: the rate curve is multiplied so that the replay's peak rate equals ``inference_peak``
x the saturated throughput of the most replicas the inference side can ever hold (its own nodes plus the
whole managed pool). Arrivals per step are that rate x ``step_s``, drawn as Poisson counts (seeded by
``seed``) when ``noise`` is on, so a step's arrivals vary as independent requests would. A request
trace (Azure, Mooncake) is replayed at its real timestamps (``InferenceWorkload.per_step``): a step's
mean is the trace's own arrivals in it, times the scale; its peak is the busiest ``peak_window_s`` (10 s,
the SLO's wait: a burst the SLO feels) of its real arrivals, not the peak of its 60-s bins (the Azure code
trace's busiest 10 s run at 3.9x its busiest minute: scaled by the minute, no policy can serve it).
"""

from __future__ import annotations

import dataclasses
import math
import random
from array import array
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from hpcserve.config import Policy, SiteConfig
from hpcserve.config.policy import JobClassName
from hpcserve.placement import FabricTopology, build_fabric_topology, natural_key
from hpcserve.rebalance.types import Side
from hpcserve.replay.inference import ServingModel, replica_throughput
from hpcserve.replay.traces import (
    DAY_S,
    InferenceWorkload,
    Pod,
    TrainingWorkload,
    read_inference,
    read_pods,
    scale_training,
)
from hpcserve.serving.spec import DeploymentSpec, Engine, SimulatorSettings
from hpcserve.slurm.models import Topology

AT0 = datetime(2023, 1, 2, tzinfo=UTC)  # a Monday: the replay's time 0, for the decision code's clocks
DEFAULT_GRACE_S = 120  # the training class's grace in ``default_policy``


@dataclass(frozen=True, slots=True)
class SimSettings:
    """The replay's knobs; the defaults are what ``hpcserve simulate`` and the benchmark use."""

    days: float = 14.0  # measured
    warmup_days: float = 1.0  # replayed before the measured days, not counted (queues fill, history grows)
    step_s: float = 1.0  # the inference fluid model's step
    autoscale_interval_s: float = 10.0  # the autoscaler's tick
    rebalance_interval_s: float = 60.0  # the split policy's tick
    sample_interval_s: float = 300.0  # demand history samples (what the forecast learns from)
    slo_wait_s: float = 10.0  # a request meets the SLO when it waited at most this long
    move_delay_s: float = 120.0  # drain done -> node usable on the other side (scontrol, health check)
    replica_startup_s: float = 180.0  # a replica's engine start (weights from the warm tier) on a node
    replica_stage_s: float = 60.0  # weights copied cold tier -> a node's warm tier, before its first replica
    replica_drain_s: float = 30.0  # a replica finishing its requests before its node can move
    checkpoint_interval_s: float = 1800.0  # training jobs checkpoint this often (run time)
    checkpoint_save_s: float = 60.0  # a job checkpointing on its signal saves in this long, then exits
    training_load: float = 0.7  # offered training GPUs / the training partition's GPUs
    inference_peak: float = 0.85  # peak rate / what the most inference nodes serve at full batch
    peak_window_s: float = 10.0  # request traces: scaled by their busiest window this long (0: 60-s bins)
    gpu_scale: int = 0  # GPUs per trace GPU; 0: the site's GPUs per node
    gpus_per_replica: int = 8
    max_num_seqs: int = 32
    backfill_depth: int = 500  # queued jobs looked at per scheduling pass (Slurm's bf_max_job_test)
    noise: bool = True  # Poisson-distributed arrivals per step (else the rate's mean exactly)
    seed: int = 0

    @property
    def warmup_s(self) -> float:
        return self.warmup_days * DAY_S

    @property
    def span_s(self) -> float:
        """The whole replay, warm-up included."""
        return (self.warmup_days + self.days) * DAY_S


@dataclass(frozen=True, slots=True)
class Scenario:
    site: SiteConfig
    settings: SimSettings
    nodes: tuple[str, ...]  # nodes on either side, natural order
    gpus: dict[str, int]
    start_side: dict[str, Side]
    pool: frozenset[str]
    topology: FabricTopology
    training: TrainingWorkload
    inference: InferenceWorkload
    arrivals: array[float] = field(repr=False)  # requests per step (a typed array: 1.3 M steps in 15 days)
    serving: ServingModel = field(repr=False)
    grace_s: float
    max_run_s: float
    training_qos: str

    min_inference_nodes: int  # the inference side's nodes outside the pool
    pool_order: tuple[str, ...]  # the pool, natural order

    @property
    def gpus_per_node(self) -> int:
        return max(self.gpus.values())

    @property
    def max_inference_nodes(self) -> int:
        return self.min_inference_nodes + len(self.pool)

    def replicas_to_nodes(self, replicas: int) -> int:
        return -(-replicas // self.serving.per_node)

    def need_gpus(self, start: float, end: float) -> float:
        """GPUs of the replicas the autoscaler would keep for the true load's peak in [start, end]."""
        rate = self.inference.curve.peak(start, end)
        return float(self.serving.replicas_for(rate) * self.serving.spec.gpus_per_replica)

    def need_nodes(self, start: float, end: float) -> int:
        """Inference nodes the autoscaler would keep for the true load's peak in [start, end]."""
        rate = self.inference.curve.peak(start, end)
        return self.replicas_to_nodes(self.serving.replicas_for(rate))


def load_scenario(
    site: SiteConfig, policy: Policy, training_trace: Path, inference_trace: Path, settings: SimSettings
) -> Scenario:
    """Read both traces and build the scenario."""
    return build_scenario(site, policy, read_pods(training_trace), read_inference(inference_trace), settings)


def build_scenario(
    site: SiteConfig, policy: Policy, pods: list[Pod], inference: InferenceWorkload, settings: SimSettings
) -> Scenario:
    """The site's sides, the training jobs and the inference load scaled to the site (module docstring)."""
    start = _start_sides(site)
    gpus = {node: site.gpus_of(node) for node in start}
    per_node = max(gpus.values())
    training = policy.for_class(JobClassName.TRAINING)
    pool = frozenset(site.managed_pool.training) | frozenset(site.managed_pool.inference)
    fixed = sum(side is Side.INFERENCE for node, side in start.items() if node not in pool)
    serving = _serving(settings, inference, per_node, fixed + len(pool))
    scaled = _scaled(inference, settings, serving.mu * serving.per_node * (fixed + len(pool)))
    target = settings.training_load * sum(gpus[n] for n in site.partitions.training.nodes if n in gpus)
    workload = scale_training(
        pods, days=settings.warmup_days + settings.days, per_node=per_node,
        gpu_scale=settings.gpu_scale or per_node, target_gpus=target, max_run_s=training.max_time_s,
    )  # fmt: skip
    return Scenario(
        site=site, settings=settings, nodes=tuple(sorted(start, key=natural_key)), gpus=gpus,
        start_side=start, pool=pool, topology=build_fabric_topology(Topology(), site), training=workload,
        inference=scaled, arrivals=_arrivals(scaled, settings), serving=serving,
        grace_s=float(training.grace_s), max_run_s=float(training.max_time_s), training_qos=training.qos,
        min_inference_nodes=fixed, pool_order=tuple(sorted(pool, key=natural_key)),
    )  # fmt: skip


def _serving(settings: SimSettings, inference: InferenceWorkload, per_node: int, nodes: int) -> ServingModel:
    spec = deployment(settings, per_node, nodes)
    return ServingModel(
        spec=spec,
        mu=replica_throughput(spec, inference.prompt_tokens, inference.output_tokens),
        per_node=max(per_node // spec.gpus_per_replica, 1),
        step_s=settings.step_s,
        startup_s=settings.replica_startup_s,
        stage_s=settings.replica_stage_s,
        autoscale_every=max(round(settings.autoscale_interval_s / settings.step_s), 1),
        at0=AT0,
    )


def _scaled(inference: InferenceWorkload, settings: SimSettings, most_rps: float) -> InferenceWorkload:
    """The workload with its replay peak at ``inference_peak`` x ``most_rps`` (all inference nodes busy)."""
    peak = inference.curve.peak(0.0, settings.span_s)
    if inference.arrival_times and settings.peak_window_s > 0:
        peak = window_peak(inference, settings.peak_window_s, settings.step_s)
    scale = settings.inference_peak * most_rps / peak if peak > 0 else 0.0
    return dataclasses.replace(inference, curve=inference.curve.scaled(scale))


def window_peak(inference: InferenceWorkload, window_s: float, step_s: float) -> float:
    """A request trace's highest mean rate over ``window_s`` (one period of its real arrivals)."""
    steps = inference.per_step(step_s, round(inference.curve.period / step_s))
    width = max(round(window_s / step_s), 1)
    total = best = sum(steps[:width])
    for k in range(width, len(steps)):
        total += steps[k] - steps[k - width]
        best = max(best, total)
    return best / (width * step_s)


def default_policy(site: SiteConfig) -> Policy:
    """The job classes a replay assumes when none is given: training is preemptible (120 s grace, 3 days
    at most), any job may use a whole side, interactive jobs have a QoS of their own (so a training job
    is never taken for one); the rebalance rules are the defaults."""
    gpus = sum(site.gpus_of(node) for node in site.all_nodes())
    parts = site.partitions
    shared = parts.shared.name if parts.shared else parts.training.name

    def job_class(partition: str, preemptible: bool, grace_s: int, qos: str = "normal") -> dict[str, object]:
        return {"partition": partition, "qos": qos, "max_gpus_per_job": gpus, "max_gpus_per_user": gpus,
                "max_time": "3-00:00:00", "default_time": "04:00:00", "preemptible": preemptible,
                "grace_s": grace_s}  # fmt: skip

    return Policy.model_validate({"classes": {
        "training": job_class(parts.training.name, True, DEFAULT_GRACE_S),
        "inference": job_class(parts.inference.name, False, 60),
        "batch": job_class(shared, True, 60),
        "interactive": job_class(parts.training.name, False, DEFAULT_GRACE_S, qos="interactive"),
    }})  # fmt: skip


def deployment(settings: SimSettings, per_node: int, nodes: int) -> DeploymentSpec:
    """The one deployment the inference side serves (the engine simulator's latency model), allowed as
    many replicas as ``nodes`` inference nodes hold; the autoscaler's other settings are the defaults."""
    per_replica = min(settings.gpus_per_replica, per_node)
    return DeploymentSpec(
        name="sim-llm",
        model="sim/llm",
        served_model_name="sim-llm",
        engine=Engine.SIMULATOR,
        gpus_per_replica=per_replica,
        min_replicas=1,
        max_replicas=max(nodes * (per_node // per_replica), 1),
        simulator=SimulatorSettings(
            startup_delay_s=settings.replica_startup_s, max_num_seqs=settings.max_num_seqs
        ),
    )


def _start_sides(site: SiteConfig) -> dict[str, Side]:
    """Each node of the training or inference partition, on that side (the site's starting split)."""
    sides = dict.fromkeys(site.partitions.training.nodes, Side.TRAINING)
    sides.update(dict.fromkeys(site.partitions.inference.nodes, Side.INFERENCE))
    return sides


def _arrivals(workload: InferenceWorkload, settings: SimSettings) -> array[float]:
    steps = int(settings.span_s / settings.step_s)
    mean = workload.per_step(settings.step_s, steps)
    if not settings.noise:
        return array("d", mean)
    rng = random.Random(settings.seed)  # noqa: S311 - simulation noise, not cryptography
    return array("d", (poisson(rng, m) for m in mean))


def poisson(rng: random.Random, mean: float) -> float:
    """A Poisson-distributed count (Knuth's product of uniforms below 30, else the normal approximation)."""
    if mean <= 0:
        return 0.0
    if mean >= 30:
        return max(rng.gauss(mean, mean**0.5), 0.0)
    limit, count, product = math.exp(-mean), 0, rng.random()
    while product > limit:
        count += 1
        product *= rng.random()
    return float(count)


def describe(scenario: Scenario) -> dict[str, object]:
    """What was replayed, in numbers (for the CLI's header and --json)."""
    s, curve = scenario.settings, scenario.inference.curve
    span = s.span_s
    mean_rate = sum(scenario.arrivals) / span if span else 0.0
    return {
        "site": scenario.site.name,
        "days": s.days,
        "warmup_days": s.warmup_days,
        "training_jobs": len(scenario.training.jobs),
        "training_compression": round(scenario.training.compression, 3),
        "training_offered_gpus": round(scenario.training.offered_gpus, 1),
        "inference_source": scenario.inference.source,
        "inference_peak_rps": round(curve.peak(0.0, span), 1),
        "inference_mean_rps": round(mean_rate, 1),
        "replica_rps": round(scenario.serving.mu, 2),
        "inference_nodes_min_max": [scenario.min_inference_nodes, scenario.max_inference_nodes],
        "slo_wait_s": s.slo_wait_s,
    }
