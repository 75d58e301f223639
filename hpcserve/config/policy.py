"""``Policy``: per job class, the partition, QoS and limits that submissions must respect."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator

from hpcserve.config.base import Frozen, Invalid, Name
from hpcserve.config.site import SiteConfig
from hpcserve.errors import ConfigError, ValidationError
from hpcserve.slurm.timefmt import parse_duration


class JobClassName(StrEnum):
    TRAINING = "training"
    INFERENCE = "inference"
    BATCH = "batch"
    INTERACTIVE = "interactive"


def duration_seconds(text: str) -> int:
    """A finite, positive Slurm duration -> seconds; anything else raises ``Invalid``."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise Invalid("", f"not a Slurm duration: {text!r}", "write D-HH:MM:SS, HH:MM:SS or MM") from exc
    if seconds is None:
        raise Invalid(
            "",
            "never submit --time=UNLIMITED: it blocks maintenance reservations",
            "give a finite limit like 2-00:00:00",
        )
    if seconds <= 0:
        raise Invalid("", f"{text!r} is no time at all", "give a limit longer than zero")
    return seconds


def _check_duration(value: object) -> str:
    if not isinstance(value, str):
        raise Invalid(
            "",
            f"not a Slurm duration: {value!r}",
            'quote it, like "12:00:00"; YAML reads unquoted 12:00:00 as a number',
        )
    duration_seconds(value)
    return value.strip()


Duration = Annotated[str, BeforeValidator(_check_duration)]
"""A Slurm duration string, checked to be finite and positive."""


class JobClass(Frozen):
    """Where and how jobs of one class run."""

    partition: Name
    qos: Name = "normal"
    max_gpus_per_job: int = Field(ge=1)
    max_gpus_per_user: int = Field(ge=1)
    max_time: Duration
    default_time: Duration
    preemptible: bool = False
    grace_s: int = Field(default=120, ge=0)  # between the checkpoint signal and the kill

    @property
    def max_time_s(self) -> int:
        return duration_seconds(self.max_time)

    @property
    def default_time_s(self) -> int:
        return duration_seconds(self.default_time)

    @model_validator(mode="after")
    def _limits_agree(self) -> JobClass:
        if self.max_gpus_per_user < self.max_gpus_per_job:
            raise Invalid(
                "max_gpus_per_user",
                f"{self.max_gpus_per_user} is below max_gpus_per_job ({self.max_gpus_per_job})",
                f"raise max_gpus_per_user to at least {self.max_gpus_per_job} or lower max_gpus_per_job",
            )
        if self.default_time_s > self.max_time_s:
            raise Invalid(
                "default_time",
                f"{self.default_time} is longer than max_time ({self.max_time})",
                "shorten default_time or raise max_time",
            )
        return self


class RebalanceRules(Frozen):
    """How the rebalancer splits the site's managed pool between training and inference.

    Node counts (``min_*``/``max_*``) are whole sides: the nodes that never move count too."""

    horizon_s: int = Field(default=1800, gt=0)  # look this far ahead; longer than a move takes
    headroom: float = Field(default=0.2, ge=0)  # inference gets its forecast GPUs x (1 + headroom)
    min_training_nodes: int = Field(default=0, ge=0)
    max_training_nodes: int | None = Field(default=None, ge=0)  # None: no limit
    min_inference_nodes: int = Field(default=0, ge=0)
    max_inference_nodes: int | None = Field(default=None, ge=0)
    hysteresis_cycles: int = Field(default=3, ge=1)  # a change must be wanted this many cycles in a row,
    hysteresis_nodes: int = Field(default=2, ge=1)  # unless it is at least this many nodes
    cooldown_s: int = Field(default=1800, ge=0)  # a node that moved does not move again for this long
    max_moves_per_cycle: int = Field(default=2, ge=1)
    release_window_s: int = Field(default=1800, ge=0)  # inference keeps what it needed this recently
    spare_ending_within_s: int = Field(default=900, ge=0)  # a job ending this soon is waited for
    profile_slot_s: int = Field(default=1800, gt=0)  # the forecast's time-of-day resolution
    ewma_halflife_s: int = Field(default=3600, gt=0)  # the forecast's fast level: the present
    baseline_halflife_s: int = Field(default=86400, gt=0)  # its slow level: where the present fades to

    @model_validator(mode="after")
    def _consistent(self) -> RebalanceRules:
        for side in ("training", "inference"):
            low, high = getattr(self, f"min_{side}_nodes"), getattr(self, f"max_{side}_nodes")
            if high is not None and high < low:
                raise Invalid(
                    f"max_{side}_nodes",
                    f"{high} is below min_{side}_nodes ({low})",
                    "raise it or lower the min",
                )
        if 86400 % self.profile_slot_s:
            raise Invalid(
                "profile_slot_s",
                f"{self.profile_slot_s} s does not divide a day",
                "use a divisor of 86400, e.g. 600, 1800 or 3600",
            )
        return self


class PrewarmRules(Frozen):
    """Pre-warm (site ``lending: overlap``): each deployment's load forecast, which raises its replica floor
    one horizon (grace + start + a tick) before a predicted burst (``hpcserve.serving.prewarm``)."""

    profile_slot_s: int = Field(default=600, gt=0)  # the load profile's time-of-day resolution
    halflife_s: int = Field(default=1800, gt=0)  # the forecast's fast level forgets the present this fast
    min_history_s: int = Field(default=86400, ge=0)  # less history than this: no floor (no profile to trust)
    start_estimate_s: int = Field(default=300, ge=0)  # a replica's scheduling + staging + engine load

    @model_validator(mode="after")
    def _slot_divides_a_day(self) -> PrewarmRules:
        if 86400 % self.profile_slot_s:
            raise Invalid(
                "profile_slot_s",
                f"{self.profile_slot_s} s does not divide a day",
                "use a divisor of 86400, e.g. 300, 600 or 1800",
            )
        return self


class IdleActions(Frozen):
    """What the service does about a flagged job, per kind: ``notify`` (a log line, /metrics and
    ``hpcserve idle``) or, for inference, ``scale_down`` (one replica fewer, never below the deployment's
    ``min_replicas``)."""

    training: Literal["notify"] = "notify"
    inference: Literal["notify", "scale_down"] = "notify"


class IdleRules(Frozen):
    """When a job's GPUs count as idle (``hpcserve.telemetry.idle``): averaged under
    ``gpu_util_below_pct`` over the last ``window_s``, sampled throughout (no gap between readings longer
    than ``sample_gap_s``); or, a replica, allocated and serving no request for ``replica_no_requests_s``
    (None: replicas are judged by their GPUs only)."""

    gpu_util_below_pct: float = Field(default=20.0, gt=0, le=100)
    window_s: int = Field(default=1800, gt=0)
    replica_no_requests_s: int | None = Field(default=1800, gt=0)
    sample_gap_s: int = Field(default=120, gt=0)
    action: IdleActions = Field(default_factory=IdleActions)


class Policy(Frozen):
    """Job classes -> their rules (all four are required), the rebalancer's rules, pre-warm's and the idle
    rules."""

    classes: dict[JobClassName, JobClass]
    rebalance: RebalanceRules = Field(default_factory=RebalanceRules)
    prewarm: PrewarmRules = Field(default_factory=PrewarmRules)
    idle: IdleRules = Field(default_factory=IdleRules)

    @model_validator(mode="after")
    def _all_classes(self) -> Policy:
        missing = [name.value for name in JobClassName if name not in self.classes]
        if missing:
            raise Invalid(
                "classes",
                f"missing classes: {', '.join(missing)}",
                f"add `classes.{missing[0]}`; every policy defines {', '.join(JobClassName)}",
            )
        return self

    def for_class(self, name: JobClassName | str) -> JobClass:
        """The rules of one class; an unknown name raises ``ValidationError``."""
        try:
            return self.classes[JobClassName(name)]
        except ValueError as exc:
            raise ValidationError(
                f"unknown job class {name!r} (use one of: {', '.join(JobClassName)})"
            ) from exc


def check_policy(policy: Policy, site: SiteConfig, path: str | Path) -> None:
    """Raise ``ConfigError`` (naming the policy file ``path``) if a class uses a partition the site lacks."""
    known = site.partition_names().values()
    for name, job_class in policy.classes.items():
        if job_class.partition not in known:
            raise ConfigError(
                str(path),
                f"classes.{name.value}.partition",
                f"partition {job_class.partition!r} is not in site {site.name!r}",
                f"use one of the site's partitions: {', '.join(sorted(set(known)))}",
            )
    _check_grace(policy, site, path)


def _check_grace(policy: Policy, site: SiteConfig, path: str | Path) -> None:
    """With lending through preemption, Slurm's GraceTime must give training the time its class promises."""
    grace_s = policy.classes[JobClassName.TRAINING].grace_s
    if site.lending.mode == "overlap" and site.lending.grace_time_s < grace_s:
        raise ConfigError(
            str(path),
            "classes.training.grace_s",
            f"{grace_s} s is longer than the site's lending.grace_time_s ({site.lending.grace_time_s} s): "
            "Slurm would kill a preempted job before it checkpoints",
            f"lower grace_s to {site.lending.grace_time_s}, or raise GraceTime in slurm.conf and "
            "lending.grace_time_s",
        )
