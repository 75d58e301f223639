"""The NVML sampler through the real pynvml against the recorded NVML device (no mock of pynvml: its ctypes
calls reach ``tests/nvml_recorded/recorded_nvml.c``, loaded as libnvidia-ml.so.1 through LD_LIBRARY_PATH),
from the command line a job or an admin would use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from hpcserve.telemetry.recorded import parse
from tests.nvml_fixtures import BUSY, IDLE, MIXED, recorded_env, recorded_nvml

__all__ = ["recorded_nvml"]  # the fixture, used by name


def hpcserve(
    library: Path, recording: Path | None, *args: str, **extra: str
) -> subprocess.CompletedProcess[str]:
    env = recorded_env(library, recording, os.environ, **extra)
    argv = [sys.executable, "-m", "hpcserve", "telemetry", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def sample_once(library: Path, recording: Path, **extra: str) -> list[dict[str, Any]]:
    done = hpcserve(library, recording, "sample", "--once", "--json", "--job", "77", **extra)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert isinstance(rows, list)
    return rows


def test_every_device_when_cuda_visible_devices_is_unset(recorded_nvml: Path) -> None:
    rows = sample_once(recorded_nvml, MIXED, HPCSERVE_NVML_REPLAY="step")
    recording = parse(MIXED.read_text())
    gpus = [d for d in recording.devices if not d.mig]
    assert [r["gpu_uuid"] for r in rows] == [d.uuid for d in gpus]  # the MIG slice is not counted
    assert [r["gpu_index"] for r in rows] == [0, 1, 2, 3]
    # step replay: the first utilisation read of each device moves it to its second row
    for row, device in zip(rows, gpus, strict=True):
        expected = recording.series(device.uuid)[1]
        assert row["job_id"] == "77" and row["name"] == device.name
        assert row["util_pct"] == expected.util_pct and row["mem_used_bytes"] == expected.mem_used_bytes
        assert row["mem_total_bytes"] == device.mem_total_bytes
        assert row["sm_clock_mhz"] == expected.sm_clock_mhz
        power = None if expected.power_mw is None else expected.power_mw / 1000
        assert row["power_w"] == power
    assert rows[2]["power_w"] is None  # NVML "not supported" became None, not a crash


def test_cuda_visible_devices_picks_and_orders_by_index_and_uuid(recorded_nvml: Path) -> None:
    uuids = [d.uuid for d in parse(MIXED.read_text()).devices]
    rows = sample_once(recorded_nvml, MIXED, CUDA_VISIBLE_DEVICES=f"3,{uuids[1]}")  # an index, a UUID
    assert [(r["gpu_index"], r["gpu_uuid"]) for r in rows] == [(0, uuids[3]), (1, uuids[1])]
    ambiguous = sample_once(recorded_nvml, MIXED, CUDA_VISIBLE_DEVICES=f"2,{uuids[1][:12]},0")
    assert [r["gpu_uuid"] for r in ambiguous] == [uuids[2]]  # CUDA stops at a prefix of several
    assert sample_once(recorded_nvml, MIXED, CUDA_VISIBLE_DEVICES="") == []


def test_a_mig_slice_without_utilisation_is_skipped_with_one_line(recorded_nvml: Path) -> None:
    mig = parse(MIXED.read_text()).devices[-1].uuid
    done = hpcserve(recorded_nvml, MIXED, "sample", "--once", "--json", CUDA_VISIBLE_DEVICES=f"{mig},0")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [(r["gpu_index"], r["gpu_uuid"]) for r in rows] == [(1, parse(MIXED.read_text()).devices[0].uuid)]
    assert done.stderr.splitlines() == [
        f"hpcserve: GPU {mig}: no utilisation or memory reading (Not Supported): not sampled"
    ]


def test_wall_clock_replay_reads_the_recordings_levels(recorded_nvml: Path) -> None:
    idle = [r["util_pct"] for r in sample_once(recorded_nvml, IDLE)]
    busy = [r["util_pct"] for r in sample_once(recorded_nvml, BUSY)]
    assert len(idle) == len(busy) == 4
    assert max(idle) <= 8 and min(busy) >= 87


def test_no_driver_is_one_line_and_exit_69(recorded_nvml: Path) -> None:
    done = hpcserve(recorded_nvml, None, "sample", "--once", "--json")
    assert done.returncode == 69
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "NVML is not available here: Driver Not Loaded" in done.stderr and "fix:" in done.stderr


def test_no_driver_never_fails_a_job_run(recorded_nvml: Path) -> None:
    done = hpcserve(
        recorded_nvml, None, "run", "--job", "5", "--interval", "1", HPCSERVE_SOCKET="/nonexistent"
    )
    assert done.returncode == 0, done.stderr
    assert "NVML is not available here" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_record_then_replay_gives_the_same_readings(recorded_nvml: Path, tmp_path: Path) -> None:
    out = tmp_path / "rec.txt"
    done = hpcserve(recorded_nvml, MIXED, "record", "--seconds", "0.3", "--interval", "0.1", "-o", str(out),
                    HPCSERVE_NVML_REPLAY="step")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "recorded 4 device(s), 12 samples" in done.stdout
    original, again = parse(MIXED.read_text()), parse(out.read_text())
    assert again.source.startswith("real GPU") and again.driver == original.driver
    assert [(d.uuid, d.mem_total_bytes, d.name) for d in again.devices] == [
        (d.uuid, d.mem_total_bytes, d.name) for d in original.devices if not d.mig
    ]
    for device in again.devices:  # step replay: rows 1, 2, 3 of the original
        got = [(r.util_pct, r.mem_used_bytes, r.power_mw, r.sm_clock_mhz) for r in again.series(device.uuid)]
        want = [
            (r.util_pct, r.mem_used_bytes, r.power_mw, r.sm_clock_mhz) for r in original.series(device.uuid)
        ]
        assert got == want[1:4]
    replayed = sample_once(recorded_nvml, out, HPCSERVE_NVML_REPLAY="step")
    assert [r["util_pct"] for r in replayed] == [again.series(d.uuid)[1].util_pct for d in again.devices]
