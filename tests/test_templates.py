"""Templates without the cluster: the headers of the shipped templates, validation, rendering (golden files),
and a property test that any value survives the shell round trip literally."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcserve.errors import ConfigError, ValidationError
from hpcserve.jobs.templates import (
    BLOCK_END,
    BLOCK_START,
    Param,
    Template,
    list_templates,
    load_template,
    parse_header,
    render,
    sbatch_directives,
    templates_dir,
    validate_params,
)

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "data" / "golden"
NAMES = ("batch-inference", "model-stage", "nccl-probe", "train-torchrun")

# Fixed values per template for the golden files: every type, and hostile text where the type allows it.
GOLDEN_CASES: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "train-torchrun": (
        {"STEPS": "3", "BACKEND": "gloo", "CKPT_DIR": "/scratch/ckpt", "RUN_NAME": "nightly; $(echo no) 'q'"},
        {"NCCL_IB_HCA": "mlx5_0,mlx5_1", "NCCL_SOCKET_IFNAME": "eth0", "HPCSERVE_FABRIC": "ib"},
    ),
    "nccl-probe": (
        {"SIZES": "1M,64M", "ITERS": "20", "BACKEND": "nccl"},
        {"NCCL_IB_HCA": "mlx5_0", "NCCL_IB_GID_INDEX": "3", "HPCSERVE_FABRIC": "roce"},
    ),
    "batch-inference": (
        {
            "INPUT": "/data/prompts.jsonl",
            "OUTPUT_DIR": "/data/out dir",
            "ENGINE": "vllm",
            "MAX_TOKENS": "128",
            "MODEL": "meta-llama/Llama-3.1-8B-Instruct",
            "TEMPERATURE": "0.7",
        },
        {},
    ),
    "model-stage": ({"MODEL": "llama-3-8b", "COLD": "/shared/models/llama-3-8b", "FORCE": "yes"}, {}),
}


def bash_env(script: str) -> dict[str, str]:
    """The environment after bash sources ``script`` (and nothing else); bash gets an argv list."""
    out = subprocess.run(
        ["bash", "-c", 'source /dev/stdin && exec env -0'], input=script.encode(), capture_output=True,
        env={"PATH": os.environ["PATH"]}, check=True, timeout=30,
    )  # fmt: skip
    items = (item.partition("=") for item in out.stdout.decode().split("\0") if item)
    return {name: value for name, _, value in items}


def export_block_of(rendered: str) -> str:
    start, end = rendered.index(BLOCK_START), rendered.index(BLOCK_END) + len(BLOCK_END)
    return rendered[start:end] + "\n"


def str_template(n: int) -> Template:
    params = tuple(Param(f"V{i}", "str", "", "any text") for i in range(n))
    return Template("t", Path("t.sbatch"), "test", params, "#!/bin/bash\n#SBATCH -N1\necho hi\n")


# --------------------------------------------------------------------------------------------- headers
def test_every_shipped_template_parses_with_a_description_and_params() -> None:
    templates = list_templates(REPO / "jobtemplates")
    assert tuple(t.name for t in templates) == NAMES
    for t in templates:
        assert t.description and t.params, t.name
        assert all(p.help for p in t.params), t.name
        assert any(o.startswith("--time=") for o in t.sbatch_options), t.name
        assert not any(o.startswith(("--partition", "-p")) for o in t.sbatch_options), t.name


@pytest.mark.parametrize("name", NAMES)
def test_header_defaults_are_the_bodys_defaults(name: str) -> None:
    template = load_template(name, REPO / "jobtemplates")
    body = template.body.replace("\\}", "}")  # model-stage escapes the brace of {node} inside ${...}
    for p in template.params:
        assert f"${{{p.name}:-{p.default}}}" in body, f"{name}: {p.name} has no ${{{p.name}:-{p.default}}}"


def test_header_of_train_torchrun() -> None:
    header = parse_header((REPO / "jobtemplates" / "train-torchrun.sbatch").read_text())
    assert "--nodes=2" in header.sbatch_options and "--ntasks-per-node=1" in header.sbatch_options
    backend = next(p for p in header.params if p.name == "BACKEND")
    assert backend == Param("BACKEND", "choice", "auto", backend.help, ("auto", "gloo", "nccl"))
    assert {p.name: p.type for p in header.params}["STEPS"] == "int"


def test_header_of_batch_inference_is_an_array() -> None:
    header = parse_header((REPO / "jobtemplates" / "batch-inference.sbatch").read_text())
    assert "--array=0-1" in header.sbatch_options
    engine = next(p for p in header.params if p.name == "ENGINE")
    assert engine.choices == ("simulator", "vllm") and engine.default == "simulator"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('# hpcserve-param: {"name": "X", "type": "int"', "not valid JSON"),
        ('# hpcserve-param: {"name": "X", "type": "number", "help": "h"}', "type must be one of"),
        ('# hpcserve-param: {"name": "1X", "type": "int", "help": "h"}', "name must match"),
        ('# hpcserve-param: {"name": "X", "type": "int", "default": "five", "help": "h"}', "must be an int"),
        ('# hpcserve-param: {"name": "X", "type": "choice", "help": "h"}', "choices go with type choice"),
        ('# hpcserve-param: {"name": "X", "type": "str", "help": "h", "hint": "?"}', "unknown keys"),
        ('# hpcserve-param: {"name": "X", "type": "str"}', "help must be"),
        ("# hpcserve-params: {}", "unknown header line"),
    ],
)
def test_bad_header_lines_are_rejected_with_the_line_number(line: str, problem: str) -> None:
    with pytest.raises(ValidationError, match=rf"line 3: .*{problem}"):
        parse_header(f"#!/bin/bash\n#SBATCH -N1\n{line}\necho hi\n")


def test_header_lines_after_the_first_command_are_rejected() -> None:
    with pytest.raises(ValidationError, match="line 3: '#SBATCH' after the first command"):
        parse_header("#!/bin/bash\necho hi\n#SBATCH --nodes=2\n")
    text = '#!/bin/bash\necho hi\n# hpcserve-param: {"name": "X", "type": "str", "help": "h"}\n'
    with pytest.raises(ValidationError, match="after the first command"):
        parse_header(text)


def test_a_parameter_declared_twice_is_rejected() -> None:
    line = '# hpcserve-param: {"name": "X", "type": "str", "help": "h"}\n'
    with pytest.raises(ValidationError, match="declared twice: X"):
        parse_header(line + line)


# ------------------------------------------------------------------------------------------- discovery
def test_templates_dir_is_the_repo_folder_or_the_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HPCSERVE_TEMPLATES", raising=False)
    assert templates_dir() == REPO / "jobtemplates"
    monkeypatch.setenv("HPCSERVE_TEMPLATES", "/somewhere/else")
    assert templates_dir() == Path("/somewhere/else")


def test_unknown_template_lists_the_available_ones() -> None:
    with pytest.raises(ValidationError) as err:
        load_template("train-torchrum", REPO / "jobtemplates")
    assert str(err.value) == f"unknown template 'train-torchrum'; available templates: {', '.join(NAMES)}"
    with pytest.raises(ValidationError, match="unknown template"):
        load_template("../jobtemplates/train-torchrun", REPO / "jobtemplates")


def test_a_broken_template_names_its_file(tmp_path: Path) -> None:
    (tmp_path / "bad.sbatch").write_text('#!/bin/bash\n# hpcserve-param: {"name": "X"}\n')
    with pytest.raises(ConfigError, match=r"bad\.sbatch: header: line 2: .*type must be one of"):
        list_templates(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        list_templates(tmp_path / "missing")


# ------------------------------------------------------------------------------------------ validation
def torchrun() -> Template:
    return load_template("train-torchrun", REPO / "jobtemplates")


def test_unknown_parameter_lists_the_valid_ones_on_one_line() -> None:
    with pytest.raises(ValidationError) as err:
        validate_params(torchrun(), {"STEP": "3"})
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("unknown parameter STEP for template train-torchrun; valid parameters: ")
    assert message.endswith(", ".join(p.name for p in torchrun().params))


def test_wrong_type_names_the_parameter_the_type_and_the_fix() -> None:
    with pytest.raises(ValidationError) as err:
        validate_params(torchrun(), {"STEPS": "five\n$(x)"})
    assert str(err.value) == (
        "template train-torchrun: parameter STEPS must be an int, got 'five\\n$(x)' "
        "(fix: pass a whole number, e.g. STEPS=5)"
    )
    for bad in ("inf", "nan", "1,5", "\u0661"):
        with pytest.raises(ValidationError, match="STEP_SECONDS must be a float"):
            validate_params(torchrun(), {"STEP_SECONDS": bad})
    with pytest.raises(ValidationError, match="BACKEND must be one of auto, gloo, nccl, got 'mpi'"):
        validate_params(torchrun(), {"BACKEND": "mpi"})


def test_values_are_normalized_in_header_order() -> None:
    stage = load_template("model-stage", REPO / "jobtemplates")
    assert validate_params(stage, {"FORCE": "Yes", "MODEL": "m"}) == {"MODEL": "m", "FORCE": "1"}
    assert validate_params(stage, {"FORCE": "off"}) == {"FORCE": "0"}
    assert validate_params(torchrun(), {"STEPS": " +7 ", "STEP_SECONDS": "1e-3", "BACKEND": ""}) == {
        "BACKEND": "", "STEPS": "7", "STEP_SECONDS": "1e-3"}  # fmt: skip
    with pytest.raises(ValidationError, match="FORCE must be a bool"):
        validate_params(stage, {"FORCE": "maybe"})
    with pytest.raises(ValidationError, match="NUL"):
        validate_params(stage, {"MODEL": "a\0b"})


# ------------------------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("name", NAMES)
def test_rendered_templates_match_their_golden_files(name: str) -> None:
    values, env = GOLDEN_CASES[name]
    rendered = render(load_template(name, REPO / "jobtemplates"), values, env)
    golden = GOLDEN / f"{name}.rendered.sbatch"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(rendered)
    assert rendered == golden.read_text(), (
        f"regenerate with UPDATE_GOLDEN=1 if the change is intended: {golden}"
    )


def test_every_template_has_a_golden_case() -> None:
    assert set(GOLDEN_CASES) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_rendered_scripts_are_valid_bash_with_the_block_after_the_header(name: str) -> None:
    template = load_template(name, REPO / "jobtemplates")
    values, env = GOLDEN_CASES[name]
    rendered = render(template, values, env)
    subprocess.run(["bash", "-n"], input=rendered, text=True, check=True, timeout=30)
    lines = rendered.split("\n")
    start = lines.index(BLOCK_START)
    assert lines[start - 1].startswith(("#SBATCH", "# hpcserve-"))
    assert all(not ln.startswith("#SBATCH") for ln in lines[start:])
    assert sbatch_directives(rendered) == template.sbatch_options


def test_render_with_nothing_set_still_marks_the_block() -> None:
    rendered = render(str_template(1), {})
    assert rendered == f"#!/bin/bash\n#SBATCH -N1\n{BLOCK_START}\n{BLOCK_END}\necho hi\n"


def test_a_value_cannot_smuggle_sbatch_options() -> None:
    template = str_template(1)
    rendered = render(template, {"V0": "x\n#SBATCH --partition=infer\n#SBATCH --wrap=id"})
    assert sbatch_directives(rendered) == ("-N1",)
    with pytest.raises(ValidationError, match="after the first command"):
        parse_header(rendered)


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"NCCL IB": "x"}, "must match"),
        ({"X=1; touch y #": "x"}, "must match"),
        ({"": "x"}, "must match"),
        ({"V0": "x"}, "is a parameter of template t"),
        ({"NCCL_ALGO": "a\0b"}, "NUL"),
    ],
)
def test_bad_env_names_and_values_are_rejected(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        render(str_template(1), {}, env)


TEXT = st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]), max_size=40)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(TEXT, min_size=1, max_size=4), extra=TEXT)
def test_any_value_arrives_literally_in_the_environment(values: list[str], extra: str) -> None:
    template = str_template(len(values))
    given_values = {f"V{i}": v for i, v in enumerate(values)}
    block = export_block_of(render(template, given_values, {"HPCSERVE_EXTRA": extra}))
    env = bash_env(block)
    assert {k: env[k] for k in given_values} == given_values
    assert env["HPCSERVE_EXTRA"] == extra


def test_hostile_values_run_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = [
        f"; touch {marker}",
        f"$(touch {marker})",
        f"`touch {marker}`",
        "'\"\\",
        f"a\ntouch {marker}\n",
    ]
    block = export_block_of(render(str_template(len(hostile)), {f"V{i}": v for i, v in enumerate(hostile)}))
    env = bash_env(block)
    assert [env[f"V{i}"] for i in range(len(hostile))] == hostile
    assert not marker.exists()
    assert re.search(r"^export V1='\$\(touch ", block, re.MULTILINE)
