"""``Policy``: per job class, the partition, QoS and limits that submissions must respect."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

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


class Policy(Frozen):
    """Job classes -> their rules; all four classes are required."""

    classes: dict[JobClassName, JobClass]

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
