"""The sections of a site config, each validated on its own (cross-section rules live in site.py)."""

from __future__ import annotations

import math
import re
import string
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from hpcserve.config.base import Frozen, HostList, Invalid, Name, nodes_text

FabricKind = Literal["infiniband", "roce", "tcp"]
DEFAULT_DATABASE_URL = "sqlite:///~/.local/state/hpcserve/hpcserve.db"
_FEATURE_CHARS = frozenset(string.ascii_letters + string.digits + "_.:-")


class SlurmSettings(Frozen):
    """How hpcserve talks to Slurm."""

    backend: Literal["cli", "pyslurm"] = "cli"
    command_timeout_s: float = Field(default=30.0, gt=0)
    slurm_conf: Path | None = None  # when set, the CLI backend exports SLURM_CONF


class NodeGroup(Frozen):
    """Nodes that share a GPU count and type."""

    names: HostList
    gpus: int = Field(ge=0)
    gpu_type: str | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> NodeGroup:
        if not self.names:
            raise Invalid("names", "no nodes in this group", "write the group's nodes like node[1-4]")
        return self


class Partition(Frozen):
    """A Slurm partition and the nodes it starts with."""

    name: Name
    nodes: HostList


class Partitions(Frozen):
    """Role -> Slurm partition; ``shared`` spans both sides and is optional."""

    training: Partition
    inference: Partition
    shared: Partition | None = None

    def by_role(self) -> dict[str, Partition]:
        roles = {"training": self.training, "inference": self.inference, "shared": self.shared}
        return {role: part for role, part in roles.items() if part is not None}

    @model_validator(mode="after")
    def _distinct_names(self) -> Partitions:
        if self.training.name == self.inference.name:
            raise Invalid(
                "inference.name",
                f"same Slurm partition {self.training.name!r} as training",
                "give training and inference their own Slurm partitions",
            )
        return self


class ManagedPool(Frozen):
    """Nodes hpcserve may move between training and inference, listed under the side each starts on."""

    training: HostList = ()
    inference: HostList = ()

    def sides(self) -> dict[str, tuple[str, ...]]:
        return {"training": self.training, "inference": self.inference}

    @model_validator(mode="after")
    def _one_side_each(self) -> ManagedPool:
        inference = set(self.inference)
        both = [node for node in self.training if node in inference]
        if both:
            verb = "is" if len(both) == 1 else "are"
            raise Invalid(
                "",
                f"{nodes_text(both)} {verb} on both sides",
                "list each node under training or inference, not both",
            )
        return self


LendingMode = Literal["overlap", "moves"]
PreemptBy = Literal["partition_prio", "qos"]


class Lending(Frozen):
    """How inference borrows training's GPUs.

    ``overlap``: through Slurm's own preemption. The training and inference partitions both span
    ``shared_nodes``; inference sits at the higher PriorityTier (``preempt: partition_prio``) or its QOS lists
    training's in ``Preempt=`` (``preempt: qos``); PreemptMode=REQUEUE, and the victim gets ``grace_time_s``
    to checkpoint. ``moves``: hpcserve moves the nodes of ``managed_pool`` between the two partitions.
    """

    mode: LendingMode = "overlap"  # SiteConfig: a site that declares a managed_pool and no mode gets moves
    shared_nodes: HostList = ()  # overlap: the nodes in both the training and the inference partition
    preempt: PreemptBy = "partition_prio"
    grace_time_s: int = Field(default=120, ge=0)  # GraceTime of training's partition (or QOS)
    training_qos: str | None = None  # preempt: qos
    inference_qos: str | None = None  # preempt: qos, its Preempt= lists training_qos
    # overlap: a folder every node and the service see (mode 1777), where training jobs touch
    # <job id> at each checkpoint; hpcserve exports it to training jobs as $HPCSERVE_CHECKPOINT_DIR
    checkpoint_dir: Path | None = None

    @model_validator(mode="after")
    def _fits_mode(self) -> Lending:
        if self.mode == "moves" and self.shared_nodes:
            raise Invalid(
                "shared_nodes", "only lending.mode overlap shares nodes",
                "set mode: overlap, or list the nodes that move under managed_pool",
            )  # fmt: skip
        if self.mode == "overlap" and not self.shared_nodes:
            raise Invalid(
                "shared_nodes", "mode overlap (the default) needs nodes in both the training and the "
                "inference partition",
                "let both partitions span the nodes to share (or list them here, like node[3-6]); or set "
                "mode: moves with a managed_pool",
            )  # fmt: skip
        return self._fits_preempt()

    def _fits_preempt(self) -> Lending:
        qos = {"training_qos": self.training_qos, "inference_qos": self.inference_qos}
        for field, name in qos.items():
            if self.preempt == "qos" and not name:
                raise Invalid(
                    field, "preempt: qos needs both QOS names", f"add `{field}`, as sacctmgr shows it"
                )
            if self.preempt != "qos" and name:
                raise Invalid(
                    field, "only preempt: qos takes QOS names", f"remove `{field}` or set preempt: qos"
                )
        if self.preempt == "qos" and self.training_qos == self.inference_qos:
            raise Invalid("inference_qos", "same QOS as training", "give inference a QOS of its own")
        if self.checkpoint_dir is not None and not self.checkpoint_dir.is_absolute():
            raise Invalid(
                "checkpoint_dir", f"{self.checkpoint_dir} is not an absolute path",
                "give the shared folder's full path, like /shared/hpcserve/checkpoints",
            )  # fmt: skip
        return self


class Fabric(Frozen):
    """A network fabric: what NCCL needs to use it."""

    kind: FabricKind
    hcas: tuple[str, ...] = ()
    gid_index: int | None = Field(default=None, ge=0)
    socket_ifname: str | None = None
    feature: str | None = None  # a Slurm node feature every node of this fabric carries (for --constraint)

    @field_validator("feature")
    @classmethod
    def _plain_feature(cls, feature: str | None) -> str | None:
        if feature is not None and not (feature and set(feature) <= _FEATURE_CHARS):
            problem = f"{feature!r} is not a plain feature name"
            raise Invalid("", problem, "write one name like ib, as slurm.conf's Features= has it")
        return feature

    @model_validator(mode="after")
    def _fits_kind(self) -> Fabric:
        if self.kind == "tcp" and self.hcas:
            raise Invalid(
                "hcas", "a tcp fabric has no HCAs", "remove `hcas` or set kind to infiniband or roce"
            )
        if self.kind != "tcp" and not self.hcas:
            raise Invalid(
                "hcas", f"{self.kind} fabrics need HCAs", "add `hcas`, e.g. [mlx5_0]; ibv_devices lists them"
            )
        if self.kind == "roce" and self.gid_index is None:
            raise Invalid(
                "gid_index", "a roce fabric needs gid_index", "add `gid_index`; 3 is RoCE v2 on most sites"
            )
        if self.kind != "roce" and self.gid_index is not None:
            raise Invalid("gid_index", "only roce fabrics take gid_index", "remove `gid_index`")
        return self


class Switch(Frozen):
    """A leaf switch (``nodes`` and ``fabric``) or an upper switch (``switches``)."""

    nodes: HostList = ()
    switches: tuple[str, ...] = ()
    fabric: str | None = None

    @property
    def is_leaf(self) -> bool:
        return bool(self.nodes)

    @model_validator(mode="after")
    def _leaf_or_upper(self) -> Switch:
        if bool(self.nodes) == bool(self.switches):
            raise Invalid(
                "", "a switch needs either nodes or switches", "give a leaf `nodes`, an upper one `switches`"
            )
        if self.nodes and self.fabric is None:
            raise Invalid(
                "fabric", "a leaf switch needs a fabric", "add `fabric`, one of the names under `fabrics`"
            )
        if self.switches and self.fabric is not None:
            raise Invalid(
                "fabric", "only leaf switches carry a fabric", "remove `fabric` from this upper switch"
            )
        return self


def check_node_path(path: str) -> str:
    """An absolute path whose only placeholders are ``{node}`` (the node's name) and ``{user}`` (the user
    whose replica stages there: a warm tier shared by all users can give each their own folder)."""
    if not path.startswith("/"):
        raise Invalid("", f"{path!r} is not an absolute path", "start the path with /")
    try:
        path.format(node="x", user="u")
    except (KeyError, IndexError, ValueError) as exc:
        raise Invalid("", f"bad placeholder in {path!r}", "use only {node} and {user} inside braces") from exc
    return path


class StorageTier(Frozen):
    """A directory for model weights; ``{node}`` in the path stands for the node's name, ``{user}`` (the
    warm tier only) for the user whose replica stages there."""

    path: str

    def path_for(self, node: str, user: str = "") -> Path:
        return Path(self.path.replace("{node}", node).replace("{user}", user))

    @field_validator("path")
    @classmethod
    def _absolute_with_node_only(cls, path: str) -> str:
        return check_node_path(path)


# vLLM's weight loaders (``vllm serve --load-format``, vLLM 0.32); runai_streamer and fastsafetensors
# stream safetensors to the GPU, 3-10x faster cold loads in published figures
LOAD_FORMATS = ("auto", "pt", "safetensors", "npcache", "dummy", "tensorizer", "sharded_state", "gguf",
                "bitsandbytes", "mistral", "runai_streamer", "runai_streamer_sharded",
                "fastsafetensors")  # fmt: skip


class Storage(Frozen):
    """Where model weights live: a shared cold tier and an optional node-local warm tier, and how vLLM
    loads them. A deployment without ``warm_tier`` stages into ``warm``; a relative model that names a
    folder under ``cold`` is served from there; ``load_format`` is passed as ``vllm serve --load-format``
    unless the deployment's engine_args set one (hpcserve.serving.site_storage)."""

    cold: StorageTier
    warm: StorageTier | None = None
    load_format: str | None = None

    @field_validator("load_format")
    @classmethod
    def _known_loader(cls, value: str | None) -> str | None:
        if value is not None and value not in LOAD_FORMATS:
            raise Invalid("", f"unknown load format {value!r}", f"use one of {', '.join(LOAD_FORMATS)}")
        return value

    @model_validator(mode="after")
    def _cold_is_shared(self) -> Storage:
        for word in ("{node}", "{user}"):
            if word in self.cold.path:
                raise Invalid("cold.path", f"the shared tier cannot depend on {word}",
                              f"remove {word} from the path")  # fmt: skip
        return self


class DatabaseSettings(Frozen):
    """hpcserve's own history database (SQLAlchemy URL)."""

    url: str = DEFAULT_DATABASE_URL

    @field_validator("url")
    @classmethod
    def _known_backend(cls, url: str) -> str:
        if not url.startswith(("sqlite", "postgresql")):
            raise Invalid(
                "",
                f"unsupported database URL {url!r}",
                "use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB",
            )
        return url

    def resolved_url(self) -> str:
        """The URL with ``~`` expanded in a sqlite path."""
        prefix = "sqlite:///"
        if self.url.startswith(prefix + "~"):
            return prefix + str(Path(self.url.removeprefix(prefix)).expanduser())
        return self.url


class ServingSettings(Frozen):
    """Where users reach the gateway, and where replica jobs keep their files (a folder every node sees)."""

    gateway_url: str = "http://127.0.0.1:8000"
    replica_dir: str = "~/.local/state/hpcserve/replicas"
    controller_interval_s: float = Field(default=2.0, gt=0)  # the service's reconcile/autoscale tick
    ready_timeout_s: float = Field(
        default=900.0, gt=0
    )  # engine start (weights load) before a replica is dead
    # a replica whose job ends within this gets a successor, then drains before its time limit (0: never);
    # it must cover a replica's start and its longest request
    renew_before_s: float = Field(default=1800.0, ge=0)
    # an engine with requests running that generates no token for this long is replaced (0: never)
    stall_s: float = Field(default=120.0, ge=0)
    # while every replica is ready and answering and the last tick did nothing, Slurm's job and node lists
    # are re-read this often instead of every tick (0: every tick); anything moving reads at once
    calm_read_s: float = Field(default=20.0, ge=0)
    # exported in every replica job's script (the admin's, never a user's), e.g. HPCSERVE_TELEMETRY: "0"
    replica_env: dict[str, str] = Field(default_factory=dict)
    # gres/shard: the shards each GPU is cut into (gres.conf's Count= on each GPU's shard line); a
    # deployment's gpu_fraction f asks for ceil(f x this) shards of one GPU
    shards_per_gpu: int = Field(default=4, ge=1)

    @field_validator("replica_env", mode="before")
    @classmethod
    def _replica_env(cls, env: object) -> object:
        if isinstance(env, dict):
            for name, value in env.items():
                check_replica_env(name, value)
        return env

    @field_validator("gateway_url")
    @classmethod
    def _http(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise Invalid("", f"{url!r} is not an http(s) URL", "write e.g. http://login1:8000")
        return url.rstrip("/")

    def replica_path(self) -> Path:
        return Path(self.replica_dir).expanduser()


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# what a replica's start rests on: its programs, its owner, its interpreter and loader, its GPUs, its engine
# key and the service's address (hpcserve's), and Slurm's and submitit's own variables
_RESERVED_ENV = frozenset({"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LD_PRELOAD", "LD_AUDIT",
                           "CUDA_VISIBLE_DEVICES", "VLLM_API_KEY", "HPCSERVE_SOCKET",
                           "HPCSERVE_SITE"})  # fmt: skip
_RESERVED_PREFIXES = ("SLURM", "SBATCH_", "SRUN_", "SALLOC_", "SUBMITIT_", "PYTHON")


def check_replica_env(name: object, value: object) -> None:
    """One ``serving.replica_env`` entry: a variable name that is not the job's own, and a string value."""
    if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
        raise Invalid(str(name), "not an environment variable name", "use letters, digits and _")
    if name in _RESERVED_ENV or name.startswith(_RESERVED_PREFIXES):
        raise Invalid(name, "reserved: Slurm, hpcserve or the login sets it", f"remove `{name}` here")
    if not isinstance(value, str):
        raise Invalid(name, f"{value!r} is not a string", f'quote it: {name}: "{value}"')
    if "\0" in value:
        raise Invalid(name, "holds a NUL character", "remove it")


SubmitMethod = Literal["runuser", "sudo", "sbatch-uid"]


class ServiceSettings(Frozen):
    """How users, replicas and other login nodes reach ``hpcserve service``, and how it runs user work.

    ``socket``: the API's Unix socket (world-connectable; the caller is the kernel's SO_PEERCRED).
    ``listen``: optional ``HOST:PORT`` for TCP, each request carrying a munge credential (other login nodes)
    or a replica's secret. ``url``: how others reach that TCP listener (``http://login1:8470``).
    ``metrics_listen``: ``HOST:PORT`` of the service's /metrics, apart from the API (an admin address).
    ``submit_as``: how replicas are submitted as their owner: ``runuser`` (service runs as root), ``sudo``
    (``sudo -n -u OWNER``, a sudoers rule for the service account), or ``sbatch-uid`` (``sbatch --uid``).
    """

    socket: str = "/run/hpcserve/api.sock"
    listen: str | None = None
    url: str | None = None
    metrics_listen: str = "127.0.0.1:9464"
    submit_as: SubmitMethod = "runuser"

    @field_validator("socket")
    @classmethod
    def _absolute_socket(cls, path: str) -> str:
        if not path.startswith("/"):
            raise Invalid("", f"{path!r} is not an absolute path", "write e.g. /run/hpcserve/api.sock")
        return path

    @field_validator("listen", "metrics_listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise Invalid("", f"{value!r} is not HOST:PORT", "write e.g. 127.0.0.1:8470")
        return value

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise Invalid("", f"{url!r} is not an http(s) URL", "write e.g. http://login1:8470")
        return None if url is None else url.rstrip("/")


class CostSettings(Frozen):
    """What a GPU-hour costs, per GRES GPU type (``gres/gpu:a100`` -> ``a100``); ``default`` for other types
    and for jobs that ask for untyped GPUs. No ``default`` key: those GPU-hours cost 0."""

    currency: str = Field(default="USD", min_length=1, max_length=8)
    gpu_hour_price: dict[str, float] = Field(default_factory=dict)

    @field_validator("gpu_hour_price")
    @classmethod
    def _non_negative(cls, prices: dict[str, float]) -> dict[str, float]:
        for gpu_type, price in prices.items():
            if not gpu_type:
                raise Invalid("", "an empty GPU type", "name the type as gres/gpu:TYPE has it, or `default`")
            if not 0 <= price < math.inf:  # also refuses NaN
                raise Invalid(
                    gpu_type, f"price {price} is not a finite number >= 0", "give a price per GPU-hour >= 0"
                )
        return prices

    def price(self, gpu_type: str | None) -> float:
        """Price of one GPU-hour of ``gpu_type`` (case-insensitive), else ``default``, else 0."""
        prices = self.gpu_hour_price
        if gpu_type:
            if gpu_type in prices:
                return prices[gpu_type]
            lowered = {name.lower(): price for name, price in prices.items()}
            if gpu_type.lower() in lowered:
                return lowered[gpu_type.lower()]
        return prices.get("default", 0.0)
