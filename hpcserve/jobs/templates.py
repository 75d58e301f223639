"""sbatch job templates: discovery, the parameter header, validation and rendering.

A template is a plain sbatch script (``jobtemplates/NAME.sbatch``) that runs as is under ``sbatch``: each
parameter defaults in the body through ``${NAME:-default}``. Its header, in comment lines among the
``#SBATCH`` lines, describes the parameters for hpcserve::

    # hpcserve-description: one line about the template
    # hpcserve-param: {"name": "STEPS", "type": "int", "default": "5", "help": "..."}

``render`` inserts one generated block of ``export NAME='value'`` lines right after the header, before the
first command, so the values (of any content) reach the script as inert data. Everything here is pure except
``templates_dir``, ``list_templates`` and ``load_template``, which read the folder. This module is on the
CLI's start path: it imports no pydantic, rich or torch, and json only when it parses a header.
"""

from __future__ import annotations

import math
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, cast, get_args

from hpcserve.errors import ConfigError, ValidationError

ParamType = Literal["str", "int", "float", "bool", "path", "choice"]
PARAM_TYPES: tuple[str, ...] = get_args(ParamType)
SUFFIX = ".sbatch"
PARAM_PREFIX = "# hpcserve-param:"
DESCRIPTION_PREFIX = "# hpcserve-description:"
BLOCK_START = "# --- hpcserve: generated settings (values are shell-quoted) ---"
BLOCK_END = "# --- end of hpcserve settings ---"
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NO_ENV: Mapping[str, str] = MappingProxyType({})

_TRUE, _FALSE = frozenset({"1", "true", "yes", "on"}), frozenset({"0", "false", "no", "off"})
_PARAM_KEYS = frozenset({"name", "type", "default", "help", "choices"})
_FIXES: dict[str, str] = {
    "int": "pass a whole number",
    "float": "pass a number such as 0.5",
    "bool": "pass one of 1, 0, true, false, yes, no",
}


@dataclass(frozen=True, slots=True)
class Param:
    """One template parameter. ``default`` is the text the body's ``${NAME:-default}`` falls back to."""

    name: str
    type: ParamType
    default: str
    help: str
    choices: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Header:
    """What ``parse_header`` reads from a template: its description, parameters and ``#SBATCH`` options."""

    description: str
    params: tuple[Param, ...]
    sbatch_options: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed template. ``body`` is the whole file text, the script that ``sbatch`` would run."""

    name: str
    path: Path
    description: str
    params: tuple[Param, ...]
    body: str
    sbatch_options: tuple[str, ...] = ()

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)


# ------------------------------------------------------------------------------------------- discovery
def templates_dir() -> Path:
    """``$HPCSERVE_TEMPLATES``, else the repository's ``jobtemplates/`` (the editable install links here)."""
    configured = os.environ.get("HPCSERVE_TEMPLATES")
    if configured:
        return Path(configured).expanduser()
    return Path(__file__).resolve().parents[2] / "jobtemplates"


def list_templates(directory: Path | None = None) -> list[Template]:
    """Every ``*.sbatch`` in the folder, parsed, sorted by name."""
    folder = directory or templates_dir()
    if not folder.is_dir():
        raise ConfigError(str(folder), "", "the template folder does not exist",
                          "set HPCSERVE_TEMPLATES to a folder of *.sbatch templates")  # fmt: skip
    return [_read(path) for path in sorted(folder.glob(f"*{SUFFIX}")) if path.is_file()]


def load_template(name: str, directory: Path | None = None) -> Template:
    """The template called ``name``; an unknown name lists the available ones."""
    folder = directory or templates_dir()
    path = folder / f"{name}{SUFFIX}"
    if not TEMPLATE_NAME.fullmatch(name) or not path.is_file():
        available = ", ".join(t.name for t in list_templates(folder)) or "none"
        raise ValidationError(f"unknown template {name!r}; available templates: {available}")
    return _read(path)


def _read(path: Path) -> Template:
    return parse_template(path.name.removesuffix(SUFFIX), path, path.read_text(encoding="utf-8"))


def parse_template(name: str, path: Path, text: str) -> Template:
    """A ``Template`` from its file text (pure); header problems name the file."""
    if not TEMPLATE_NAME.fullmatch(name):
        raise ConfigError(str(path), "", f"{name!r} is not a valid template name",
                          "use letters, digits, '.', '_' and '-' in the file name")  # fmt: skip
    try:
        header = parse_header(text)
    except ValidationError as exc:
        raise ConfigError(str(path), "header", str(exc)) from exc
    return Template(name, path, header.description, header.params, text, header.sbatch_options)


# ----------------------------------------------------------------------------------------------- header
def parse_header(text: str) -> Header:
    """The description, parameters and ``#SBATCH`` options; header lines after the first command raise."""
    lines = text.split("\n")
    end = _preamble_end(lines)
    description, params, options = "", list[Param](), list[str]()
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not _is_header_line(stripped):
            continue
        if number > end:
            raise ValidationError(f"line {number}: {_directive(stripped)!r} after the first command "
                                  "is ignored by sbatch; move it above the first command")  # fmt: skip
        if stripped.startswith("#SBATCH"):
            options.append(stripped.removeprefix("#SBATCH").strip())
        elif stripped.startswith(PARAM_PREFIX):
            params.append(_parse_param(stripped.removeprefix(PARAM_PREFIX), number))
        elif stripped.startswith(DESCRIPTION_PREFIX):
            description = stripped.removeprefix(DESCRIPTION_PREFIX).strip()
        else:
            raise ValidationError(f"line {number}: unknown header line {_directive(stripped)!r}; "
                                  f"use {PARAM_PREFIX!r} or {DESCRIPTION_PREFIX!r}")  # fmt: skip
    _check_unique(params)
    return Header(description, tuple(params), tuple(options))


def sbatch_directives(text: str) -> tuple[str, ...]:
    """The ``#SBATCH`` options sbatch itself reads from a script: those before the first command."""
    lines = text.split("\n")
    preamble = (line.strip() for line in lines[: _preamble_end(lines)])
    return tuple(line.removeprefix("#SBATCH").strip() for line in preamble if line.startswith("#SBATCH"))


def _is_header_line(stripped: str) -> bool:
    return stripped.startswith(("#SBATCH", "# hpcserve-"))


def _directive(stripped: str) -> str:
    return "#SBATCH" if stripped.startswith("#SBATCH") else stripped.split(":", 1)[0]


def _preamble_end(lines: list[str]) -> int:
    """The number of leading lines that are blank or comments: sbatch reads #SBATCH lines only there."""
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return index
    return len(lines)


def _parse_param(raw: str, number: int) -> Param:
    import json

    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ValidationError(f"line {number}: the parameter is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValidationError(f"line {number}: the parameter must be a JSON object")
    param = _param_from(cast(dict[str, Any], data), number)
    if param.default:
        check_value(param, param.default, where=f"line {number}: the default of")
    return param


def _param_from(data: dict[str, Any], number: int) -> Param:
    unknown = sorted(set(data) - _PARAM_KEYS)
    if unknown:
        raise ValidationError(f"line {number}: unknown keys {unknown}; valid keys: {sorted(_PARAM_KEYS)}")
    name, kind = data.get("name"), data.get("type")
    default, help_text, choices = data.get("default", ""), data.get("help"), data.get("choices", [])
    if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
        raise ValidationError(f"line {number}: name must match {ENV_NAME.pattern}, got {name!r}")
    if kind not in PARAM_TYPES:
        raise ValidationError(f"line {number}: {name}: type must be one of {', '.join(PARAM_TYPES)}")
    if not isinstance(default, str) or not isinstance(help_text, str) or not help_text:
        raise ValidationError(f"line {number}: {name}: default and help must be strings (help not empty)")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise ValidationError(f"line {number}: {name}: choices must be a list of strings")
    if (kind == "choice") != bool(choices):
        raise ValidationError(f"line {number}: {name}: choices go with type choice, and it needs them")
    return Param(name, cast(ParamType, kind), default, help_text, tuple(choices))


def _check_unique(params: list[Param]) -> None:
    names = [p.name for p in params]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValidationError(f"parameters declared twice: {', '.join(twice)}")


# ------------------------------------------------------------------------------------------- validation
def validate_params(template: Template, values: Mapping[str, str]) -> dict[str, str]:
    """Checked and normalized values, in header order. Unknown names, bad types and bad choices raise."""
    unknown = sorted(set(values) - set(template.param_names))
    if unknown:
        valid = ", ".join(template.param_names) or "none"
        raise ValidationError(f"unknown parameter {', '.join(unknown)} for template {template.name}; "
                              f"valid parameters: {valid}")  # fmt: skip
    where = f"template {template.name}: parameter"
    return {p.name: check_value(p, values[p.name], where=where) for p in template.params if p.name in values}


def check_value(param: Param, value: str, *, where: str = "parameter") -> str:
    """The value normalized for its type (bools become 1/0); empty means "use the default"."""
    if "\0" in value:
        raise ValidationError(f"{where} {param.name} contains a NUL byte, which a shell variable cannot hold")
    if value == "" or param.type in ("str", "path"):
        return value
    if param.type == "choice":
        if value not in param.choices:
            raise ValidationError(f"{where} {param.name} must be one of {', '.join(param.choices)}, "
                                  f"got {_show(value)}")  # fmt: skip
        return value
    normalized = _normalize(param.type, value.strip())
    if normalized is None:
        example = f", e.g. {param.name}={param.default}" if param.default else ""
        raise ValidationError(f"{where} {param.name} must be {_article(param.type)} {param.type}, "
                              f"got {_show(value)} (fix: {_FIXES[param.type]}{example})")  # fmt: skip
    return normalized


def _normalize(kind: str, text: str) -> str | None:
    if kind == "int":
        return str(int(text)) if re.fullmatch(r"[+-]?[0-9]+", text) else None
    if kind == "float":
        return text if _is_finite_number(text) else None
    lowered = text.lower()
    return "1" if lowered in _TRUE else "0" if lowered in _FALSE else None


def _is_finite_number(text: str) -> bool:
    try:
        return text.isascii() and math.isfinite(float(text))
    except ValueError:
        return False


def _article(kind: str) -> str:
    return "an" if kind[0] in "aeiou" else "a"


def _show(value: str, width: int = 40) -> str:
    """A value for a one-line message: repr escapes newlines; long values are cut."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


# -------------------------------------------------------------------------------------------- rendering
def render(template: Template, values: Mapping[str, str], env: Mapping[str, str] = NO_ENV) -> str:
    """The exact script to submit: the template with the generated export block after its header."""
    block = export_block({**validate_params(template, values), **_checked_env(template, env)})
    lines = template.body.split("\n")
    at = _insert_at(lines)
    return "\n".join([*lines[:at], block, *lines[at:]])


def export_block(values: Mapping[str, str]) -> str:
    """``export NAME=<quoted>`` lines between two fixed marker comments (no value ever lands in a comment)."""
    exports = [f"export {name}={shlex.quote(value)}" for name, value in values.items()]
    return "\n".join([BLOCK_START, *exports, BLOCK_END])


def _checked_env(template: Template, env: Mapping[str, str]) -> dict[str, str]:
    for name, value in env.items():
        if not ENV_NAME.fullmatch(name):
            raise ValidationError(f"environment variable name {_show(name)} must match {ENV_NAME.pattern}")
        if name in template.param_names:
            raise ValidationError(f"environment variable {name} is a parameter of template {template.name}; "
                                  "pass it as a parameter instead")  # fmt: skip
        if "\0" in value:
            raise ValidationError(f"environment variable {name} contains a NUL byte")
    return dict(env)


def _insert_at(lines: list[str]) -> int:
    """After the last ``#SBATCH`` or header line before the first command; else after the shebang."""
    end = _preamble_end(lines)
    header = [i for i, line in enumerate(lines[:end]) if _is_header_line(line.strip())]
    if header:
        return header[-1] + 1
    return 1 if lines and lines[0].startswith("#!") else 0
