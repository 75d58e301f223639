"""The site's ``storage`` section applied to a replica's spec when the service launches it.

What a deployment leaves out, the site's storage gives:
- the warm tier: a deployment without ``warm_tier`` stages its weights into the site's ``storage.warm``
  (node-local, ``{node}`` = the node's name) when the site has one;
- the cold tier: a ``model`` given relative (``org/model``) that names a folder under ``storage.cold`` is
  served from there (else it stays as given: a hub id for the engine to download);
- a pool's members: each member's spec as a deployment's (``members_with_site_storage``), since each is
  one engine of the pool's replicas, staged and loaded as a replica of its own would be;
- the fast loader: ``storage.load_format`` (e.g. ``runai_streamer``, ``fastsafetensors``) becomes
  ``vllm serve --load-format`` unless the deployment's ``engine_args`` set one (vLLM only; the engine
  simulator reads no weights).

The stored spec stays as the user wrote it; only the copy handed to the replica job changes.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hpcserve.config.sections import Storage
    from hpcserve.serving.spec import DeploymentSpec

LOAD_FORMAT_ARG = "load-format"


def is_folder(path: str) -> bool:
    """Whether ``path`` is a folder this process may see (a refusal counts as no)."""
    from pathlib import Path

    try:
        return Path(path).is_dir()
    except OSError:
        return False


def with_site_storage(
    spec: DeploymentSpec, storage: Storage | None, is_dir: Callable[[str], bool] = is_folder
) -> DeploymentSpec:
    """``spec`` with the site's warm tier, cold-tier model path and load format where it gives none."""
    if storage is None:
        return spec
    update: dict[str, Any] = {}
    if spec.warm_tier is None and storage.warm is not None:
        update["warm_tier"] = storage.warm.path
    cold = cold_model(spec.model, storage.cold.path, is_dir)
    if cold is not None:
        update["model"] = cold
    if storage.load_format and spec.engine == "vllm" and LOAD_FORMAT_ARG not in spec.engine_args:
        update["engine_args"] = {**spec.engine_args, LOAD_FORMAT_ARG: storage.load_format}
    return spec.model_copy(update=update) if update else spec


def members_with_site_storage(
    members: Sequence[Mapping[str, Any]], storage: Storage | None, is_dir: Callable[[str], bool] = is_folder
) -> list[DeploymentSpec]:
    """A pool's member specs (as stored) validated, each with the site's storage applied."""
    from hpcserve.serving.spec import DeploymentSpec

    return [with_site_storage(DeploymentSpec.model_validate(m), storage, is_dir) for m in members]


def cold_model(model: str, cold_root: str, is_dir: Callable[[str], bool]) -> str | None:
    """The cold tier's folder for a relative ``model`` when it has one; None otherwise."""
    parts = model.split("/")
    if model.startswith(("/", "~")) or ".." in parts or "." in parts:
        return None
    path = posixpath.join(cold_root, model)
    return path if is_dir(path) else None
