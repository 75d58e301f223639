"""The engine's command line for one replica, as argv items (no shell ever sees them).

``vllm_serve_argv`` builds ``vllm serve MODEL --served-model-name ... --host ... --port ...
--tensor-parallel-size N --pipeline-parallel-size M`` followed by the deployment's ``engine_args``;
``simulator_argv`` builds the same for hpcserve's engine simulator. Engine args are checked against the
flags recorded from vLLM (``vllm_flags.VLLM_SERVE_FLAGS``): a misspelt one is refused with the closest
real flags, before anything reaches Slurm.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from hpcserve.errors import ValidationError
from hpcserve.serving.vllm_flags import VLLM_SERVE_FLAGS, VLLM_VERSION

if TYPE_CHECKING:
    from hpcserve.serving.spec import DeploymentSpec, EngineArg

# Flags hpcserve sets itself, with what to change instead.
RESERVED = {
    "--model": "set `model`",
    "--served-model-name": "set `served_model_name`",
    "--host": "leave it out: the replica binds the node's address",
    "--port": "leave it out: the replica picks a free port",
    "--uds": "leave it out: the gateway reaches replicas over TCP",
    "--tensor-parallel-size": "set `gpus_per_replica`",
    "--pipeline-parallel-size": "set `nodes_per_replica`",
    "--data-parallel-size": "raise `max_replicas`: each replica is one data-parallel copy",
    "--api-key": "leave it out: the service gives each replica's engine its own key (VLLM_API_KEY)",
    "--help": "leave it out",
}
SLEEP_MODE_FLAG = "--enable-sleep-mode"  # vLLM's (and the simulator's): /sleep, /wake_up, /is_sleeping work
DEV_MODE_ENV = "VLLM_SERVER_DEV_MODE"  # "1" in the engine's environment: vLLM mounts those endpoints


def has_sleep_mode(spec: DeploymentSpec) -> bool:
    """Whether the deployment's engines run in sleep mode: it has a warm tier (``warm_after_s``) or is in a
    pool. Its replicas then run the replica agent beside their engines (hpcserve.serving.agent)."""
    return spec.warm_after_s is not None or spec.pool is not None


def _sleep_mode_argv(spec: DeploymentSpec) -> list[str]:
    return [SLEEP_MODE_FLAG] if has_sleep_mode(spec) else []


def normalize_engine_arg(key: str) -> str:
    """``max_model_len``, ``--max-model-len`` -> ``max-model-len``; after a ``.`` (vLLM's JSON keys,
    ``compilation-config.mode``) the text is kept as it is."""
    base, dot, rest = key.lstrip("-").partition(".")
    return base.replace("_", "-") + dot + rest


def engine_arg_problem(key: str) -> tuple[str, str] | None:
    """(problem, fix) when ``key`` is no flag of ``vllm serve`` or is one hpcserve sets; else None."""
    flag = "--" + normalize_engine_arg(key).partition(".")[0]
    if flag in RESERVED:
        return f"{flag} is set by hpcserve", RESERVED[flag]
    if flag in VLLM_SERVE_FLAGS:
        return None
    close = difflib.get_close_matches(flag, sorted(VLLM_SERVE_FLAGS), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return (
        f"unknown vLLM flag {flag}",
        f"{hint}use a flag of `vllm serve --help` (recorded from vLLM {VLLM_VERSION})",
    )


def engine_args_argv(args: Mapping[str, EngineArg]) -> list[str]:
    """``{flag: value}`` -> argv items; raises ``ValidationError`` naming an unknown or reserved flag."""
    argv: list[str] = []
    for key, value in args.items():
        problem = engine_arg_problem(key)
        if problem is not None:
            raise ValidationError(f"engine_args.{key}: {problem[0]} (fix: {problem[1]})")
        argv += _flag_items("--" + normalize_engine_arg(key), value)
    return argv


def _flag_items(flag: str, value: EngineArg) -> list[str]:
    if isinstance(value, bool) and "." not in flag:
        negated = "--no-" + flag.removeprefix("--")
        if value:
            return [flag]
        return [negated] if negated in VLLM_SERVE_FLAGS else []
    text = _text(value)
    # argparse would read a value starting with "-" as a flag of its own
    return [f"{flag}={text}"] if text.startswith("-") else [flag, text]


def _text(value: EngineArg) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


MEMORY_FLAG = "--gpu-memory-utilization"


def memory_utilization(spec: DeploymentSpec) -> str | None:
    """The engine's share of its GPU's memory: the spec's own ``gpu-memory-utilization`` engine arg, else its
    ``gpu_fraction`` (a replica on shards of a GPU shares that GPU), else None (the engine's default)."""
    value = spec.engine_args.get(MEMORY_FLAG.removeprefix("--"))
    if value is not None:
        return _text(value)
    return None if spec.gpu_fraction is None else _text(spec.gpu_fraction)


def _fraction_argv(spec: DeploymentSpec) -> list[str]:
    """``--gpu-memory-utilization <gpu_fraction>`` unless the engine args set it (they are passed already)."""
    if spec.gpu_fraction is None or MEMORY_FLAG.removeprefix("--") in spec.engine_args:
        return []
    return [MEMORY_FLAG, _text(spec.gpu_fraction)]


def vllm_serve_argv(spec: DeploymentSpec, host: str, port: int, *, vllm: str = "vllm") -> list[str]:
    """The ``vllm serve`` command for one replica of ``spec``, listening on ``host:port``.

    ``gpus_per_replica`` becomes the tensor parallel size and ``nodes_per_replica`` the pipeline parallel
    size. Across several nodes vLLM also needs its multi-node setup (e.g. ``--nnodes``/``--node-rank``/
    ``--master-addr`` or a Ray cluster), which the replica job provides, not this function.
    """
    return [
        vllm,
        "serve",
        spec.model,
        "--served-model-name",
        spec.served_model_name,
        "--host",
        host,
        "--port",
        str(port),
        "--tensor-parallel-size",
        str(spec.gpus_per_replica),
        "--pipeline-parallel-size",
        str(spec.nodes_per_replica),
        *engine_args_argv(spec.engine_args),
        *_fraction_argv(spec),
        *_sleep_mode_argv(spec),
    ]


def simulator_argv(spec: DeploymentSpec, host: str, port: int, *, python: str = "python") -> list[str]:
    """The engine simulator's command (``python -m hpcserve engine-sim``) for one replica of ``spec``.

    Of the engine args it passes on only ``max-model-len`` and the memory share (``memory_utilization``);
    the replica swaps ``python`` for its own interpreter.
    """
    engine_args_argv(spec.engine_args)  # the same checks as for vllm, so switching engines is safe
    sim = spec.sim
    argv = [
        python,
        "-m",
        "hpcserve",
        "engine-sim",
        spec.model,
        "--served-model-name",
        spec.served_model_name,
        "--host",
        host,
        "--port",
        str(port),
        "--startup-delay",
        str(sim.startup_delay_s),
        "--max-num-seqs",
        str(sim.max_num_seqs),
        "--prefill-tokens-per-s",
        str(sim.prefill_tokens_per_s),
        "--decode-ms-per-token",
        str(sim.decode_ms_per_token),
    ]
    memory = memory_utilization(spec)
    argv += [MEMORY_FLAG, memory] if memory is not None else []
    max_len = spec.engine_args.get("max-model-len")
    return (
        argv + (["--max-model-len", _text(max_len)] if max_len is not None else []) + _sleep_mode_argv(spec)
    )
