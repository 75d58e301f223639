"""Read a site config or policy from YAML; every problem becomes one ``ConfigError`` line."""

from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import pydantic
import yaml
from pydantic import BaseModel
from pydantic_core import ErrorDetails

from hpcserve.config.base import Invalid
from hpcserve.config.policy import Policy
from hpcserve.config.site import SiteConfig
from hpcserve.errors import ConfigError

M = TypeVar("M", bound=BaseModel)
PathLike = str | os.PathLike[str]

_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "string": "a string",
    "bool": "true or false",
    "dict": "a mapping",
    "model": "a mapping",
    "list": "a list",
    "tuple": "a list",
    "path": "a path",
}


def load_site_config(path: PathLike) -> SiteConfig:
    """Read and validate a site config (e.g. site_configs/minicluster.yaml)."""
    return _load(SiteConfig, path)


def load_policy(path: PathLike) -> Policy:
    """Read and validate a policy (e.g. policies/default.yaml); see also ``check_policy``."""
    return _load(Policy, path)


def _load(model: type[M], path: PathLike) -> M:
    data = read_mapping(path)
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise to_config_error(str(path), model, exc) from exc


def read_mapping(path: PathLike) -> dict[str, Any]:
    """The YAML file's top-level mapping; a missing, unreadable or malformed file raises ``ConfigError``."""
    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(
            where, "", "no such file", "check the path; examples are in site_configs/ and policies/"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            where, "", f"cannot read the file: {exc}", "make it a readable UTF-8 text file"
        ) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(where, "", _yaml_problem(exc), "correct the YAML syntax there") from exc
    if not isinstance(data, dict):
        problem = f"the top level must be a mapping, got {type(data).__name__}"
        raise ConfigError(
            where, "", problem, "write `field: value` lines, as in site_configs/minicluster.yaml"
        )
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"not valid YAML: {exc.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return f"not valid YAML: {str(exc).splitlines()[0]}"


def to_config_error(path: str, model: type[BaseModel], exc: pydantic.ValidationError) -> ConfigError:
    """The first of pydantic's errors as one line, with a fix; ``(+N more)`` counts the rest."""
    errors = exc.errors(include_url=False)
    field, problem, fix = describe(model, errors[0])
    if len(errors) > 1:
        problem += f" (+{len(errors) - 1} more)"
    return ConfigError(path, field, _one_line(problem), _one_line(fix))


def describe(model: type[BaseModel], error: ErrorDetails) -> tuple[str, str, str]:
    """One pydantic error -> (dotted field, problem, fix)."""
    loc = tuple(error["loc"])
    if loc and loc[-1] == "[key]":  # a bad key in a mapping: name the key itself
        loc = loc[:-1]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, Invalid):
        extra = tuple(cause.field.split(".")) if cause.field else ()
        return _dotted(loc + extra), cause.problem, cause.fix
    return _dotted(loc), *_problem_and_fix(model, loc, error)


def _problem_and_fix(
    model: type[BaseModel], loc: tuple[int | str, ...], error: ErrorDetails
) -> tuple[str, str]:
    kind, last = error["type"], str(loc[-1]) if loc else ""
    if kind == "missing":
        return "required field is missing", f"add `{last}`"
    if kind == "extra_forbidden":
        valid = _fields_at(model, loc[:-1])
        return "unknown field", f"remove `{last}`" + (
            f"; valid fields here: {', '.join(valid)}" if valid else ""
        )
    problem, got = _lower_first(error["msg"]), _short_repr(error["input"])
    expected = _expected(kind, error)
    return problem, (f"expected {expected}, got {got}" if expected else f"replace {got} with a valid value")


def _expected(kind: str, error: ErrorDetails) -> str | None:
    if kind in ("literal_error", "enum"):
        return f"one of {error.get('ctx', {}).get('expected', '')}"
    if kind.endswith(("_type", "_parsing")) or kind == "int_from_float":
        base = kind.split("_")[0]
        return _EXPECTED.get(base, base)
    return None


def _fields_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """Names of the fields of the model found at ``loc`` inside ``model`` ([] if there is none)."""
    tp: Any = model
    for part in loc:
        tp = _child(tp, part)
    tp = _unwrap(tp)
    return list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def _child(tp: Any, part: int | str) -> Any:
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(str(part))
        return field.annotation if field else None
    origin, args = get_origin(tp), get_args(tp)
    if origin is dict:
        return args[1]
    if origin in (list, tuple):
        return args[0]
    return None


def _unwrap(tp: Any) -> Any:
    """Strip ``Annotated`` and ``X | None`` down to X."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _unwrap(get_args(tp)[0])
    if origin in (Union, types.UnionType):
        args = [arg for arg in get_args(tp) if arg is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else tp
    return tp


def _dotted(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


def _short_repr(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _one_line(text: str) -> str:
    return " ".join(text.split())
