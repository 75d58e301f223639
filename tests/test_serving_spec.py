"""Deployment specs: the examples, one clear line for each mistake in YAML or in CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from hpcserve.errors import ConfigError, ValidationError
from hpcserve.serving.spec import (
    VLLM_DEFAULT_MAX_NUM_SEQS,
    DeploymentSpec,
    Engine,
    build_deployment,
    load_deployment,
)

DEPLOYMENTS = Path(__file__).resolve().parent / "data" / "deployments"
TINY = DEPLOYMENTS / "tiny-sim.yaml"
LLAMA = DEPLOYMENTS / "llama-70b-vllm.yaml"


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def yaml_error(tmp_path: Path, edits: dict[str, Any], field: str) -> str:
    """tiny-sim.yaml with ``edits`` must fail with one line that names the file, ``field`` and a fix."""
    path = write(tmp_path, {**yaml.safe_load(TINY.read_text()), **edits})
    with pytest.raises(ConfigError) as info:
        load_deployment(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {field}: ") and "(fix: " in message and "\n" not in message
    return message


@pytest.mark.parametrize("path", sorted(DEPLOYMENTS.glob("*.yaml")))
def test_examples_load_and_round_trip(path: Path) -> None:
    spec = load_deployment(path)
    assert DeploymentSpec.model_validate(spec.model_dump(mode="json")) == spec


def test_example_values() -> None:
    tiny, llama = load_deployment(TINY), load_deployment(LLAMA)
    assert (tiny.engine, tiny.served_model_name, tiny.sim.max_num_seqs) == (Engine.SIMULATOR, "tiny-sim", 8)
    assert tiny.scales_to_zero and tiny.max_num_seqs == 8
    assert llama.engine_args["enable-prefix-caching"] is True
    assert (llama.max_num_seqs, llama.scales_to_zero, llama.warm_tier) == (128, False, "/local/{node}/models")


def test_defaults() -> None:
    spec = build_deployment({"name": "qwen", "model": "Qwen/Qwen3-0.6B"})
    assert (spec.served_model_name, spec.engine, spec.gpus_per_replica, spec.nodes_per_replica) == (
        "qwen", Engine.VLLM, 1, 1,
    )  # fmt: skip
    assert (spec.min_replicas, spec.max_replicas, spec.target_waiting_per_replica) == (0, 1, 4.0)
    assert (spec.scale_up_window_s, spec.scale_down_window_s, spec.idle_to_zero_s) == (10, 300, 600)
    assert spec.max_num_seqs == VLLM_DEFAULT_MAX_NUM_SEQS and spec.time_limit is None


def test_engine_arg_spellings_are_normalized() -> None:
    spec = build_deployment(
        {"name": "a", "model": "m", "engine_args": {"max_model_len": 8, "--dtype": "half"}}
    )
    assert spec.engine_args == {"max-model-len": 8, "dtype": "half"}


def test_scale_to_zero_needs_min_zero_and_an_idle_time() -> None:
    base = {"name": "a", "model": "m"}
    assert build_deployment(base).scales_to_zero
    assert not build_deployment({**base, "idle_to_zero_s": 0}).scales_to_zero
    assert not build_deployment({**base, "min_replicas": 1}).scales_to_zero


@pytest.mark.parametrize(
    ("edits", "field", "words"),
    [
        ({"name": "Tiny_Sim"}, "name", "not DNS-safe"),
        ({"name": "a" * 64}, "name", "not DNS-safe"),
        ({"model": "two words"}, "model", "one word"),
        ({"engine": "tgi"}, "engine", "one of 'vllm' or 'simulator'"),
        ({"min_replicas": 4, "max_replicas": 2}, "max_replicas", "below min_replicas"),
        ({"max_replicas": 0}, "max_replicas", "greater than or equal to 1"),
        ({"target_waiting_per_replica": 0}, "target_waiting_per_replica", "greater than 0"),
        ({"engine_args": {"max-model-length": 4096}}, "engine_args.max-model-length", "--max-model-len"),
        ({"engine_args": {"port": 9000}}, "engine_args.port", "set by hpcserve"),
        ({"engine_args": {"seed": [1, 2]}}, "engine_args.seed", "a number or true/false"),
        ({"engine": "vllm", "gpus_per_replica": 1}, "simulator", "drop simulator"),
        ({"time_limit": "UNLIMITED"}, "time_limit", "maintenance reservations"),
        ({"warm_tier": "local/{node}"}, "warm_tier", "absolute path"),
        ({"warm_tier": "/local/{host}"}, "warm_tier", "only {node}"),
        ({"replicas": 3}, "replicas", "unknown field"),
    ],
)
def test_yaml_mistakes_are_one_line(tmp_path: Path, edits: dict[str, Any], field: str, words: str) -> None:
    assert words in yaml_error(tmp_path, edits, field)


def test_vllm_needs_a_gpu(tmp_path: Path) -> None:
    path = write(tmp_path, {"name": "a", "model": "m", "gpus_per_replica": 0})
    with pytest.raises(ConfigError, match="gpus_per_replica: vllm needs at least one GPU"):
        load_deployment(path)


def test_engine_args_given_twice(tmp_path: Path) -> None:
    path = write(
        tmp_path, {"name": "a", "model": "m", "engine_args": {"max_model_len": 1, "max-model-len": 2}}
    )
    with pytest.raises(ConfigError, match="given twice"):
        load_deployment(path)


def test_missing_file_points_to_the_examples(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"no such file \(fix: check the path; examples are in tests/data/deployments/"
    ):
        load_deployment(tmp_path / "nope.yaml")


def test_flag_errors_name_the_flag() -> None:
    with pytest.raises(ValidationError, match=r"^--max-replicas: 1 is below min_replicas \(2\) \(fix: "):
        build_deployment({"name": "a", "model": "m", "min_replicas": 2, "max_replicas": 1})
    with pytest.raises(ValidationError, match=r"^--model: required field is missing"):
        build_deployment({"name": "a"})
    with pytest.raises(ValidationError, match=r"^--engine-args gpu-mem: unknown vLLM flag --gpu-mem"):
        build_deployment({"name": "a", "model": "m", "engine_args": {"gpu_mem": 0.9}})


def test_flags_override_a_yaml() -> None:
    base = load_deployment(TINY)
    spec = build_deployment({"name": "tiny-2", "max_replicas": 5, "partition": None}, base=base)
    assert (spec.name, spec.served_model_name, spec.max_replicas) == ("tiny-2", "tiny-2", 5)
    assert spec.engine_args == base.engine_args and spec.simulator == base.simulator
    named = build_deployment({"name": "llama-b"}, base=load_deployment(LLAMA))
    assert named.served_model_name == "meta-llama/Llama-3.1-70B-Instruct"  # set explicitly: kept
    more = build_deployment({"engine_args": {"max_model_len": 1024, "seed": 7}}, base=base)
    assert more.engine_args == {"max-model-len": 1024, "seed": 7}
