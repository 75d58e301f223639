"""``DeploymentSpec``: one model served as Slurm jobs (replicas) behind the gateway, and how it scales.

Read from YAML with ``load_deployment(path)`` (examples: tests/data/deployments/) or built from CLI flags
with ``build_deployment(values)``. Every problem is one line naming the field and the fix.

Fields (``s`` = seconds):
- ``name``: the deployment's name, DNS-safe (lowercase letters, digits and ``-``, at most 63 characters).
- ``model``: what the engine loads: a path on the shared filesystem or a hub id such as ``org/model``.
- ``served_model_name``: the name clients ask for in ``/v1/*`` requests; defaults to ``name``.
- ``engine``: ``vllm`` (``vllm serve``) or ``simulator`` (hpcserve's engine simulator, no GPU needed).
- ``gpus_per_replica``: GPUs per node of one replica = vLLM's tensor parallel size (at least 1 for vllm).
- ``nodes_per_replica``: nodes of one replica = vLLM's pipeline parallel size (default 1).
- ``min_replicas`` / ``max_replicas``: bounds the autoscaler never leaves; ``max_replicas`` >= max(1, min).
- ``target_waiting_per_replica``: while no replica runs anything yet (from zero, or all starting), the
  queued requests one replica is added for (default 4). The queue is the engines' waiting requests plus
  those buffered at the gateway. Once replicas run requests, the autoscaler sizes by load instead: running
  plus queued requests over 90% of what the replicas run at once (``max_num_seqs``, or what they were
  seen to hold), so a backlog built up during a long start does not ask for far more replicas than needed.
- ``scale_up_window_s``: how long that need must stay above the current count before a scale-up
  (default 10; 0 = at once). A deployment at zero replicas starts one at once when the gateway buffers a
  request.
- ``scale_down_window_s``: how long fewer replicas must have been enough before a scale-down (default 300).
- ``idle_to_zero_s``: with ``min_replicas: 0``, the last replica stops after this long without any
  request (arriving, queued, running or streaming); default 600. ``0`` disables scaling to zero: the
  deployment still starts at zero and wakes on its first request, but then keeps one replica. With
  ``min_replicas`` >= 1 it has no effect.
- ``engine_args``: extra ``vllm serve`` flags, ``{flag: value}`` without the dashes (``max-model-len: 8192``;
  ``max_model_len`` works too). ``true`` passes ``--flag``, ``false`` passes ``--no-flag`` where vLLM has
  one and nothing otherwise. Checked against vLLM's recorded flags (hpcserve/serving/vllm_flags.py); the
  flags hpcserve sets itself (model, host, port, served model name, parallel sizes) are refused.
  The simulator honours ``max-model-len`` and ignores the rest.
- ``warm_tier``: a node-local folder to copy the weights to before the engine starts (``{node}`` stands
  for the node's name); none: the site's ``storage.warm`` when it has one, else ``model`` is loaded
  directly (hpcserve.serving.site_storage). A warm copy is checked by its manifest, not re-hashed.
- ``partition``: none = the policy's inference class partition.
- ``time_limit``: each replica job's Slurm time limit (``D-HH:MM:SS``); none = the policy's inference
  default. UNLIMITED is refused: it blocks maintenance reservations.
- ``simulator``: settings of the engine simulator, allowed only with ``engine: simulator``:
  ``startup_delay_s``, ``prefill_tokens_per_s``, ``decode_ms_per_token``, ``max_num_seqs``.
- ``gpu_fraction`` (0 < f < 1): part of one GPU, placed on Slurm's gres/shard: ceil(f x the site's
  ``serving.shards_per_gpu``) shards of one GPU, on the node where they pack onto the fewest GPUs; the engine
  gets ``--gpu-memory-utilization f`` unless ``engine_args`` set it. Needs ``gpus_per_replica: 1`` and
  ``nodes_per_replica: 1``. Shards share the GPU without isolation (Slurm's gres/shard).
- ``mig_profile``: a MIG slice instead (``1g.10gb``, ``3g.40gb``: the site's typed MIG GRES, asked as
  ``--gres=gpu:PROFILE:1``); not with ``gpu_fraction``; the same one-GPU, one-node shape.
- Residency tiers (hpcserve/serving/tiers.py), counted from the last request: ``warm_after_s``: idle this
  long, the engines sleep (level 1, weights in host RAM) and the jobs are kept; the gateway wakes them on
  the next request. Must be below ``idle_to_zero_s`` (the cold tier: no job) when the deployment scales to
  zero. ``off_after_s``: idle this long, nothing stays staged; only with scaling to zero, above
  ``idle_to_zero_s``. None: that tier is skipped. A warm tier starts the engines in sleep mode.
- ``pool``: join model pool NAME (hpcserve/serving/pools.py): the pool's replica jobs run one engine per
  member, in sleep mode; the member has no replicas of its own. Every member of a pool has the same
  replica shape (engine, GPUs, nodes, partition, time limit, GPU fraction, MIG profile) and owner.
  ``pool_max_awake``: engines awake at once per replica (at least 1; only with ``pool``).
- Overload at the gateway (hpcserve/serving/gateway/overload.py):
  - ``max_concurrency``: requests each gateway sends one replica at once; more wait in the gateway,
    interactive keys' first, then batch keys'. Default: the replica's ``max_num_seqs``; 0: no bound.
  - ``interactive_reserve``: of those slots, how many per replica only interactive requests take
    (default: an eighth of ``max_concurrency``, at least 1).
  - ``shed_wait_s``: at ``max_replicas``, a request expected to wait longer than this for a slot gets 503
    with a Retry-After from the queue's drain rate, batch requests first (default 30; none: never shed).
    Below ``max_replicas`` requests wait, and count towards the autoscaler's queue.
  - ``fallback``: another deployment that requests of keys made with ``--allow-fallback`` (and that reach
    it) are sent to when the expected wait passes ``fallback_wait_s`` (default: ``shed_wait_s``).
  - ``overload_max_tokens``: the cap on a request's max_tokens while requests wait for a slot.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any

import pydantic
from pydantic import Field, field_validator, model_validator

from hpcserve.config.base import Frozen, Invalid
from hpcserve.config.loader import describe, read_mapping, to_config_error
from hpcserve.config.policy import Duration
from hpcserve.config.sections import check_node_path
from hpcserve.errors import ConfigError, ValidationError
from hpcserve.model.engine_defaults import ENGINE_SIM as SIM
from hpcserve.model.gateway import Overload
from hpcserve.serving.vllm_cmd import engine_arg_problem, normalize_engine_arg

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# NVIDIA's MIG profiles (1g.10gb, 3g.40gb, 7g.80gb), also as NVML-detected GRES types name them (a100_1g.5gb)
_MIG_PROFILE = re.compile(r"^([a-z0-9]+_)?[1-7]g\.[0-9]{1,3}gb$")
EXAMPLES = "tests/data/deployments/"
VLLM_DEFAULT_MAX_NUM_SEQS = 256  # `vllm serve` on GPUs below 70 GiB (vLLM 0.32); larger GPUs get 1024


def _scalar(value: object) -> object:
    if not isinstance(value, str | int | float | bool):
        raise Invalid(
            "", f"expected text, a number or true/false, got {value!r}", "give one value (JSON as a string)"
        )
    return value


EngineArg = Annotated[str | int | float | bool, pydantic.BeforeValidator(_scalar)]


class Engine(StrEnum):
    VLLM = "vllm"
    SIMULATOR = "simulator"


def _one_word(value: str) -> str:
    if not value or any(c.isspace() or ord(c) < 32 for c in value):
        raise Invalid("", f"{value!r} is empty or holds spaces", "write it as one word, like org/model")
    return value


Word = Annotated[str, pydantic.AfterValidator(_one_word)]


class SimulatorSettings(Frozen):
    """How the engine simulator behaves (only with ``engine: simulator``); defaults: ``ENGINE_SIM``, the
    simulator's one source (hpcserve.model.engine_defaults)."""

    startup_delay_s: float = Field(default=SIM.startup_delay_s, ge=0)  # "loading weights" before /health
    prefill_tokens_per_s: float = Field(default=SIM.prefill_tokens_per_s, ge=1)
    decode_ms_per_token: float = Field(default=SIM.decode_ms_per_token, ge=0)  # a lone sequence's step
    max_num_seqs: int = Field(default=SIM.max_num_seqs, ge=1)  # requests running at once; the rest wait


class DeploymentSpec(Frozen):
    """One served model; see the module docstring for every field."""

    name: str
    model: Word
    served_model_name: Word
    engine: Engine = Engine.VLLM
    gpus_per_replica: int = Field(default=1, ge=0)
    nodes_per_replica: int = Field(default=1, ge=1)
    min_replicas: int = Field(default=0, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_waiting_per_replica: float = Field(default=4.0, gt=0)
    scale_up_window_s: float = Field(default=10.0, ge=0)
    scale_down_window_s: float = Field(default=300.0, ge=0)
    idle_to_zero_s: float = Field(default=600.0, ge=0)
    engine_args: dict[str, EngineArg] = Field(default_factory=dict)
    warm_tier: str | None = None
    partition: str | None = None
    time_limit: Duration | None = None
    simulator: SimulatorSettings | None = None
    max_concurrency: int | None = Field(default=None, ge=0)
    interactive_reserve: int | None = Field(default=None, ge=0)
    shed_wait_s: float | None = Field(default=30.0, ge=0)
    fallback: str | None = None
    fallback_wait_s: float | None = Field(default=None, ge=0)
    overload_max_tokens: int | None = Field(default=None, ge=1)
    # residency tiers (hpcserve.serving.tiers): idle this long -> warm (asleep, job kept); idle_to_zero_s
    # -> cold (no job, weights staged); off_after_s -> off (nothing staged). None: no such tier.
    warm_after_s: float | None = Field(default=None, ge=0)
    off_after_s: float | None = Field(default=None, ge=0)
    # a model pool (hpcserve.serving.pools): the pool's replica jobs run one engine per member model, at
    # most ``pool_max_awake`` of them awake at once; the pool's members share its replica shape
    pool: str | None = None
    pool_max_awake: int = Field(default=1, ge=1)
    # part of one GPU: a fraction placed on gres/shard, or a MIG profile placed on typed MIG GRES
    gpu_fraction: float | None = Field(default=None, gt=0, lt=1)
    mig_profile: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _served_name_defaults_to_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("served_model_name") is None and "name" in data:
            return {**data, "served_model_name": data["name"]}
        return data

    @field_validator("name", "fallback", "pool")
    @classmethod
    def _dns_safe(cls, name: str | None) -> str | None:
        if name is not None and not _DNS_LABEL.match(name):
            raise Invalid(
                "",
                f"{name!r} is not DNS-safe",
                "use lowercase letters, digits and '-', start and end with a letter or digit, at most 63",
            )
        return name

    @field_validator("engine_args")
    @classmethod
    def _known_flags(cls, args: dict[str, EngineArg]) -> dict[str, EngineArg]:
        flags: dict[str, EngineArg] = {}
        for key, value in args.items():
            problem = engine_arg_problem(key)
            if problem is not None:
                raise Invalid(key, *problem)
            flag = normalize_engine_arg(key)
            if flag in flags:
                raise Invalid(key, f"{flag} is given twice", "keep one spelling of it")
            flags[flag] = value
        return flags

    @field_validator("mig_profile")
    @classmethod
    def _mig_name(cls, profile: str | None) -> str | None:
        if profile is not None and not _MIG_PROFILE.match(profile):
            raise Invalid("", f"{profile!r} is not a MIG profile name",
                          "use the name the site's GRES type has, like 1g.10gb or 3g.40gb")  # fmt: skip
        return profile

    @field_validator("warm_tier")
    @classmethod
    def _absolute(cls, path: str | None) -> str | None:
        return None if path is None else check_node_path(path)

    @model_validator(mode="after")
    def _consistent(self) -> DeploymentSpec:
        if self.max_replicas < self.min_replicas:
            raise Invalid(
                "max_replicas",
                f"{self.max_replicas} is below min_replicas ({self.min_replicas})",
                f"raise max_replicas to at least {self.min_replicas} or lower min_replicas",
            )
        if self.engine is Engine.VLLM and self.gpus_per_replica < 1:
            raise Invalid(
                "gpus_per_replica", "vllm needs at least one GPU", "set gpus_per_replica: 1 or more"
            )
        if self.engine is Engine.VLLM and self.simulator is not None:
            raise Invalid(
                "simulator", "simulator settings with engine vllm", "set engine: simulator, or drop simulator"
            )
        self._fallback_consistent()
        self._tiers_consistent()
        self._pool_consistent()
        self._part_gpu_consistent()
        return self

    def _part_gpu_consistent(self) -> None:
        """gpu_fraction (GPU shards) or mig_profile (a MIG slice): part of ONE GPU of one node, not both."""
        if self.gpu_fraction is not None and self.mig_profile is not None:
            raise Invalid("mig_profile", "set together with gpu_fraction",
                          "keep one: gpu_fraction (GPU shards) or mig_profile (a MIG slice)")  # fmt: skip
        part = "gpu_fraction" if self.gpu_fraction is not None else "mig_profile"
        if self.gpu_fraction is None and self.mig_profile is None:
            return
        shape = {"gpus_per_replica": self.gpus_per_replica, "nodes_per_replica": self.nodes_per_replica}
        for field, value in shape.items():
            if value != 1:
                raise Invalid(part, f"is part of one GPU, but {field} is {value}",
                              f"set {field}: 1, or drop {part} to use whole GPUs")  # fmt: skip

    def _tiers_consistent(self) -> None:
        """warm before cold before off: each idle window longer than the one before."""
        cold = self.idle_to_zero_s if self.scales_to_zero else None
        if self.warm_after_s is not None and cold is not None and self.warm_after_s >= cold:
            raise Invalid("warm_after_s", f"{self.warm_after_s:g}s is not below idle_to_zero_s ({cold:g}s)",
                          f"set warm_after_s below {cold:g}, or raise idle_to_zero_s")  # fmt: skip
        if self.off_after_s is None:
            return
        if cold is None:
            raise Invalid("off_after_s", "never reached: the deployment never goes cold (min_replicas > 0 "
                          "or idle_to_zero_s 0)", "drop off_after_s, or set min_replicas: 0 and "
                          "idle_to_zero_s > 0")  # fmt: skip
        if self.off_after_s <= cold:
            raise Invalid("off_after_s", f"{self.off_after_s:g}s is not above idle_to_zero_s ({cold:g}s)",
                          f"set off_after_s above {cold:g}, or lower idle_to_zero_s")  # fmt: skip

    def _pool_consistent(self) -> None:
        if self.pool is None and self.pool_max_awake != 1:
            raise Invalid("pool_max_awake", "set without a pool", "add --pool NAME, or drop --pool-max-awake")
        self._sleep_mode_consistent()

    def _sleep_mode_consistent(self) -> None:
        """Sleep mode (a warm tier or a pool) runs every engine of a replica, and its agent, on one node:
        vLLM over several nodes is refused here rather than by the replica job, once it runs."""
        if self.engine is not Engine.VLLM or self.nodes_per_replica == 1:
            return
        field = "pool" if self.pool is not None else "warm_after_s" if self.warm_after_s is not None else None
        if field is not None:
            raise Invalid(field, f"sleep mode runs on one node per replica, but nodes_per_replica is "
                          f"{self.nodes_per_replica} (engine vllm)",
                          f"set nodes_per_replica: 1, or drop {field}")  # fmt: skip

    def _fallback_consistent(self) -> None:
        if self.fallback == self.name:
            raise Invalid("fallback", "a deployment cannot fall back to itself", "name another deployment")
        if self.fallback is not None and self.fallback_wait_s is None and self.shed_wait_s is None:
            raise Invalid("fallback_wait_s", "a fallback needs a wait to start at",
                          "set fallback_wait_s (or shed_wait_s)")  # fmt: skip

    @property
    def overload(self) -> Overload:
        """What the gateway does when this deployment's replicas are saturated (defaults filled in)."""
        bound = self.max_num_seqs if self.max_concurrency is None else self.max_concurrency or None
        reserve = self.interactive_reserve
        if reserve is None:
            reserve = max(1, bound // 8) if bound else 0
        return Overload(bound, reserve, self.shed_wait_s, self.max_replicas, self.fallback,
                        self.fallback_wait_s, self.overload_max_tokens)  # fmt: skip

    @property
    def sim(self) -> SimulatorSettings:
        """The simulator's settings, defaults filled in."""
        return self.simulator or SimulatorSettings()

    @property
    def scales_to_zero(self) -> bool:
        """Whether an idle deployment stops its last replica (after ``idle_to_zero_s``)."""
        return self.min_replicas == 0 and self.idle_to_zero_s > 0

    @property
    def max_num_seqs(self) -> int:
        """Requests one replica runs at once: the simulator's setting, vLLM's flag, or vLLM's default."""
        if self.engine is Engine.SIMULATOR:
            return self.sim.max_num_seqs
        value = str(self.engine_args.get("max-num-seqs", ""))
        return int(value) if value.isdigit() and int(value) > 0 else VLLM_DEFAULT_MAX_NUM_SEQS


def load_deployment(path: str | os.PathLike[str]) -> DeploymentSpec:
    """Read and validate a deployment YAML; every problem raises one ``ConfigError`` line."""
    try:
        data = read_mapping(path)
    except ConfigError as exc:
        if exc.problem != "no such file":
            raise
        raise ConfigError(
            str(path), "", "no such file", f"check the path; examples are in {EXAMPLES}"
        ) from exc
    try:
        return DeploymentSpec.model_validate(data)
    except pydantic.ValidationError as exc:
        raise to_config_error(str(path), DeploymentSpec, exc) from exc


def build_deployment(values: Mapping[str, object], base: DeploymentSpec | None = None) -> DeploymentSpec:
    """A spec from CLI flags (``None`` = not given), over ``base`` (e.g. a loaded YAML) when there is one.

    ``engine_args`` given here are added to the base's. Problems raise ``ValidationError`` naming the flag.
    """
    given = {key: value for key, value in values.items() if value is not None}
    data: dict[str, Any] = base.model_dump(mode="json") if base else {}
    renamed = base is not None and "name" in given and "served_model_name" not in given
    if renamed and data["served_model_name"] == data["name"]:  # it was the default: follow the new name
        del data["served_model_name"]
    extra_args = given.pop("engine_args", None)
    data.update(given)
    if isinstance(extra_args, Mapping):
        extra = {normalize_engine_arg(str(key)): value for key, value in extra_args.items()}
        data["engine_args"] = {**data.get("engine_args", {}), **extra}
    try:
        return DeploymentSpec.model_validate(data)
    except pydantic.ValidationError as exc:
        raise _flag_error(exc) from exc


def _flag_error(exc: pydantic.ValidationError) -> ValidationError:
    errors = exc.errors(include_url=False)
    field, problem, fix = describe(DeploymentSpec, errors[0])
    top, _, rest = field.partition(".")
    flag = "--" + top.replace("_", "-") + (f" {rest}" if rest else "")
    return ValidationError(f"{flag}: {' '.join(problem.split())} (fix: {' '.join(fix.split())})")
