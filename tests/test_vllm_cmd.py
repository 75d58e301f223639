"""The engine command lines: the recorded vLLM flags, ``vllm serve`` argv, the simulator argv.

``python -m tests.test_vllm_cmd`` rewrites hpcserve/serving/vllm_flags.py from
tests/data/vllm_serve_flags.txt (after the file is recorded again from a newer vLLM).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from hpcserve.errors import ValidationError
from hpcserve.serving import vllm_flags
from hpcserve.serving.spec import build_deployment, load_deployment
from hpcserve.serving.vllm_cmd import engine_args_argv, simulator_argv, vllm_serve_argv
from hpcserve.serving.vllm_flags import VLLM_SERVE_FLAGS

DATA = Path(__file__).resolve().parent / "data"
RECORDED = DATA / "vllm_serve_flags.txt"
LLAMA = DATA / "deployments" / "llama-70b-vllm.yaml"
TINY = DATA / "deployments" / "tiny-sim.yaml"

_HEADER = '''"""The flags of ``vllm serve``, recorded from vLLM {version}.

Generated from tests/data/vllm_serve_flags.txt (how it was recorded: tests/data/README.md): do not edit
by hand. tests/test_vllm_cmd.py checks that this module is what ``python -m tests.test_vllm_cmd`` writes.
"""

VLLM_VERSION = "{version}"

# fmt: off
VLLM_SERVE_FLAGS: frozenset[str] = frozenset({{
'''


def render_flags_module(flags: list[str], version: str) -> str:
    """The text of hpcserve/serving/vllm_flags.py for these flags."""
    items = " ".join(f'"{flag}",' for flag in sorted(set(flags)))
    body = textwrap.fill(
        items,
        width=110,
        initial_indent="    ",
        subsequent_indent="    ",
        break_long_words=False,
        break_on_hyphens=False,
    )
    return _HEADER.format(version=version) + body + "\n})\n# fmt: on\n"


def recorded_flags() -> list[str]:
    return RECORDED.read_text().split()


def test_shipped_flags_are_the_recorded_ones() -> None:
    flags = recorded_flags()
    assert flags == sorted(set(flags)) and all(flag.startswith("--") for flag in flags)
    assert frozenset(flags) == VLLM_SERVE_FLAGS
    module = Path(vllm_flags.__file__).read_text()
    assert module == render_flags_module(flags, vllm_flags.VLLM_VERSION), "run python -m tests.test_vllm_cmd"


@pytest.mark.parametrize(
    "flag",
    [
        "--tensor-parallel-size", "--pipeline-parallel-size", "--gpu-memory-utilization", "--max-model-len",
        "--served-model-name", "--host", "--port", "--quantization", "--enable-prefix-caching",
        "--no-enable-prefix-caching", "--max-num-seqs", "--dtype", "--download-dir", "--trust-remote-code",
        "--enforce-eager", "--kv-cache-dtype", "--max-num-batched-tokens", "--api-key",
    ],
)  # fmt: skip
def test_common_flags_are_known(flag: str) -> None:
    assert flag in VLLM_SERVE_FLAGS


def test_vllm_serve_argv_for_the_example() -> None:
    spec = load_deployment(LLAMA)
    assert vllm_serve_argv(spec, "10.1.2.3", 8123) == [
        "vllm", "serve", "/shared/models/Meta-Llama-3.1-70B-Instruct",
        "--served-model-name", "meta-llama/Llama-3.1-70B-Instruct",
        "--host", "10.1.2.3", "--port", "8123",
        "--tensor-parallel-size", "4", "--pipeline-parallel-size", "1",
        "--max-model-len", "32768", "--gpu-memory-utilization", "0.92", "--max-num-seqs", "128",
        "--enable-prefix-caching", "--dtype", "bfloat16", "--kv-cache-dtype", "fp8",
    ]  # fmt: skip


def test_pipeline_parallel_across_nodes_and_own_executable() -> None:
    spec = build_deployment(
        {"name": "big", "model": "org/big", "gpus_per_replica": 8, "nodes_per_replica": 2}
    )
    argv = vllm_serve_argv(spec, "h", 1, vllm="/opt/vllm/bin/vllm")
    assert argv[:3] == ["/opt/vllm/bin/vllm", "serve", "org/big"]
    assert argv[-4:] == ["--tensor-parallel-size", "8", "--pipeline-parallel-size", "2"]


def test_booleans_become_flags_or_their_negation() -> None:
    args = {
        "enforce-eager": True,
        "enable-prefix-caching": False,  # vLLM has --no-enable-prefix-caching
        "disable-log-stats": False,  # a plain switch: false is its default, so nothing is passed
    }
    assert engine_args_argv(args) == ["--enforce-eager", "--no-enable-prefix-caching"]


def test_values_stay_single_argv_items() -> None:
    args: dict[str, str | int | float | bool] = {
        "chat-template": "{{ messages }} ; rm -rf / $(id)",
        "seed": -1,  # starts with "-": glued to its flag so argparse reads it as the value
        "compilation-config.mode": 3,  # vLLM's dotted JSON keys
        "compilation-config.use_inductor_graph_partition": False,
    }
    assert engine_args_argv(args) == [
        "--chat-template", "{{ messages }} ; rm -rf / $(id)",
        "--seed=-1",
        "--compilation-config.mode", "3",
        "--compilation-config.use_inductor_graph_partition", "false",
    ]  # fmt: skip


def test_unknown_engine_arg_names_it_and_suggests() -> None:
    with pytest.raises(ValidationError) as info:
        engine_args_argv({"max-model-length": 4096})
    message = str(info.value)
    assert message.startswith("engine_args.max-model-length: unknown vLLM flag --max-model-length")
    assert "did you mean --max-model-len" in message and "\n" not in message


def test_builder_checks_specs_that_skipped_validation() -> None:
    # model_copy does not validate: the builder must still catch the misspelt flag
    spec = load_deployment(LLAMA).model_copy(update={"engine_args": {"gpu_mem_util": 0.9}})
    with pytest.raises(ValidationError, match="did you mean --gpu-memory-utilization"):
        vllm_serve_argv(spec, "h", 1)


@pytest.mark.parametrize(
    ("key", "fix"),
    [
        ("port", "free port"),
        ("tensor_parallel_size", "gpus_per_replica"),
        ("--model", "`model`"),
        ("api_key", "its own key"),
    ],
)
def test_flags_hpcserve_sets_are_refused(key: str, fix: str) -> None:
    with pytest.raises(ValidationError, match=f"is set by hpcserve.*{fix}"):
        engine_args_argv({key: 1})


def test_simulator_argv_for_the_example() -> None:
    spec = load_deployment(TINY)
    assert simulator_argv(spec, "10.1.2.3", 9000) == [
        "python", "-m", "hpcserve", "engine-sim", "sim/tiny-model",
        "--served-model-name", "tiny-sim", "--host", "10.1.2.3", "--port", "9000",
        "--startup-delay", "3.0", "--max-num-seqs", "8",
        "--prefill-tokens-per-s", "8000.0", "--decode-ms-per-token", "10.0",
        "--max-model-len", "4096",
    ]  # fmt: skip


def test_simulator_defaults_and_no_max_model_len() -> None:
    spec = build_deployment({"name": "s", "model": "m", "engine": "simulator", "gpus_per_replica": 0})
    argv = simulator_argv(spec, "127.0.0.1", 1, python="/usr/bin/python3")
    assert argv[0] == "/usr/bin/python3" and "--max-model-len" not in argv
    assert argv[argv.index("--max-num-seqs") + 1] == "32"


if __name__ == "__main__":
    target = Path(vllm_flags.__file__)
    target.write_text(render_flags_module(recorded_flags(), vllm_flags.VLLM_VERSION))
    print(f"wrote {target}")
