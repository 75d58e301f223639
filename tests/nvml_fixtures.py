"""The recorded NVML device for tests: ``tests/nvml_recorded/recorded_nvml.c`` built as ``libnvidia-ml.so.1``
in a folder of its own. A process whose ``LD_LIBRARY_PATH`` starts with that folder (set before it starts:
the loader reads it once) and whose ``HPCSERVE_NVML_RECORDING`` names a recording gets that recording from
pynvml's real entry points. ``tests/data/nvml/*.rec`` are synthetic recordings (their headers say so);
``hpcserve telemetry record`` writes real ones on a GPU node."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "nvml_recorded" / "recorded_nvml.c"
RECORDINGS = HERE / "data" / "nvml"
IDLE, BUSY, MIXED = (RECORDINGS / f"synthetic-{name}.rec" for name in ("idle", "busy", "mixed"))
LIBRARY = "libnvidia-ml.so.1"


def build_recorded_nvml(folder: Path) -> Path:
    """Compile the recorded NVML library into ``folder``; the folder to put on LD_LIBRARY_PATH."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler here to build the recorded NVML device (install gcc)")
    folder.mkdir(parents=True, exist_ok=True)
    argv = [gcc, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", f"-Wl,-soname,{LIBRARY}",
            "-o", str(folder / LIBRARY), str(SOURCE), "-lm"]  # fmt: skip
    subprocess.run(argv, check=True, capture_output=True, text=True)
    return folder


def recorded_env(
    library_dir: Path, recording: Path | None, base: Mapping[str, str], **extra: str
) -> dict[str, str]:
    """``base`` with the recorded device first on LD_LIBRARY_PATH and ``recording`` to replay (None: a node
    whose driver does not answer)."""
    env = {k: v for k, v in base.items() if k not in ("HPCSERVE_NVML_RECORDING", "CUDA_VISIBLE_DEVICES")}
    paths = [str(library_dir), *filter(None, [base.get("LD_LIBRARY_PATH")])]
    env["LD_LIBRARY_PATH"] = ":".join(paths)
    if recording is not None:
        env["HPCSERVE_NVML_RECORDING"] = str(recording)
    return {**env, **extra}


@pytest.fixture(scope="session")
def recorded_nvml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder holding the recorded ``libnvidia-ml.so.1`` (built once per test session)."""
    return build_recorded_nvml(tmp_path_factory.mktemp("recorded-nvml"))
