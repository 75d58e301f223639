"""Decision code stays pure: the import-linter contracts (pyproject.toml, run by scripts/test.sh) catch a
forbidden import, and importing the decision modules (their packages' ``__init__`` included, which
import-linter does not follow) loads no I/O package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

DECISIONS = (
    "hpcserve.rebalance.planner",
    "hpcserve.rebalance.forecast",
    "hpcserve.serving.autoscaler",
    "hpcserve.serving.reconciler",
    "hpcserve.placement.select",
    "hpcserve.serving.gateway.routing",
    "hpcserve.serving.gateway.tenancy",
    "hpcserve.serving.gateway.admission",
    "hpcserve.api.limits",
    "hpcserve.config",
    "hpcserve.model.cluster",
)
IO_MODULES = (
    "aiohttp",
    "yaml",
    "sqlalchemy",
    "alembic",
    "httpx",
    "click",
    "subprocess",
    "hpcserve.config.loader",
    "hpcserve.store",
    "hpcserve.service",
    "hpcserve.cli",
    "hpcserve.slurm.runner",
    "hpcserve.slurm.cli_backend",
)

# The planner imports hpcserve.model (the cluster snapshot), so this contract must break.
WRONG_CONTRACT = """
[tool.importlinter]
root_package = "hpcserve"
include_external_packages = true
exclude_type_checking_imports = true

[[tool.importlinter.contracts]]
name = "deliberately wrong: the planner may not import the model"
type = "forbidden"
source_modules = ["hpcserve.rebalance.planner"]
forbidden_modules = ["hpcserve.model", "yaml"]
"""


def _lint(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_contracts_catch_a_forbidden_import(tmp_path: Path) -> None:
    config = tmp_path / "wrong.toml"
    config.write_text(WRONG_CONTRACT)
    run = _lint(str(config))
    assert run.returncode != 0, run.stdout
    assert "hpcserve.rebalance.planner is not allowed to import hpcserve.model" in run.stdout
    assert "not allowed to import yaml" not in run.stdout  # the planner really loads no YAML


def test_project_contracts_are_kept() -> None:
    run = _lint()
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_decision_imports_load_no_io_package() -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {DECISIONS!r}: importlib.import_module(name)\n"
        f"print(','.join(m for m in {IO_MODULES!r} if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == ""
