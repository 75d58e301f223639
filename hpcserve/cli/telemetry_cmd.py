"""``hpcserve telemetry``: the NVML sampler from the command line. ``sample`` reads this node's GPUs (those
``CUDA_VISIBLE_DEVICES`` shows), ``record`` writes a recording that the tests' recorded NVML device replays,
and ``run`` reports a job's GPUs to the service until the job ends (what the job templates start)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from hpcserve.cli.main import JSON_HELP

if TYPE_CHECKING:
    from hpcserve.model.telemetry import GpuSample
    from hpcserve.telemetry.nvml import NvmlSampler

COLUMNS = ("GPU", "UUID", "NAME", "UTIL %", "MEM USED GIB", "MEM TOTAL GIB", "POWER W", "SM MHZ")
positive = click.FloatRange(min=0.01)


@click.group()
def telemetry() -> None:
    """GPU telemetry through NVML: sample, record, report."""


@telemetry.command()
@click.option("--once", is_flag=True, help="One sample and exit (default: every --interval until Ctrl-C).")
@click.option("--interval", type=positive, default=1.0, show_default=True, help="Seconds between samples.")
@click.option("--job", "job_id", default=lambda: os.environ.get("SLURM_JOB_ID", ""),
              help="The job id the samples carry [default: $SLURM_JOB_ID].")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP + " One line per sample round.")
def sample(once: bool, interval: float, job_id: str, as_json: bool) -> None:
    """Read utilisation, memory, power and SM clock of the GPUs this process sees."""
    import time

    with _opened(job_id) as sampler:
        while True:
            _emit(sampler, sampler.sample(), as_json)
            if once:
                return
            time.sleep(interval)


@telemetry.command()
@click.option("--seconds", type=positive, default=10.0, show_default=True, help="How long to record.")
@click.option("--interval", type=positive, default=1.0, show_default=True, help="Seconds between samples.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The recording file to write (replayed by tests/nvml_recorded).")  # fmt: skip
def record(seconds: float, interval: float, output: Path) -> None:
    """Record this node's GPUs into a file the recorded NVML device replays."""
    from hpcserve.telemetry.recorded import record as record_devices
    from hpcserve.telemetry.recorded import render

    with _opened("") as sampler:
        recording = record_devices(sampler, seconds, interval)
    output.write_text(render(recording))
    click.echo(f"recorded {len(recording.devices)} device(s), {len(recording.rows)} samples: {output}")


@telemetry.command()
@click.option("--job", "job_id", required=True, help="The job whose GPUs these are ($SLURM_JOB_ID).")
@click.option("--interval", type=positive, default=None,
              help="Seconds between samples [default: $HPCSERVE_TELEMETRY_INTERVAL_S, else 15].")  # fmt: skip
def run(job_id: str, interval: float | None) -> None:
    """Report the job's GPUs to the service every --interval until SIGTERM. Never fails: without NVML, or
    with HPCSERVE_TELEMETRY=0, it says so and exits 0."""
    from hpcserve.telemetry.devices import job_sees_gpus
    from hpcserve.telemetry.nvml import NvmlSampler
    from hpcserve.telemetry.reporter import Reporter, client_post, enabled, interval_from_env, site_client

    logging.basicConfig(level=logging.INFO, format="%(asctime)s hpcserve %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not enabled():
        click.echo("hpcserve telemetry: off (HPCSERVE_TELEMETRY=0)", err=True)
        return
    if not job_sees_gpus(os.environ):
        click.echo(f"hpcserve telemetry: job {job_id} has no GPUs: nothing to report", err=True)
        return
    every = interval if interval is not None else interval_from_env()
    reporter = Reporter(job_id, NvmlSampler(job_id), client_post(site_client), every)

    def end(signum: int, frame: FrameType | None) -> None:
        reporter.stop(timeout=0)

    signal.signal(signal.SIGTERM, end)
    signal.signal(signal.SIGINT, end)
    reporter.run()


class _opened:
    """An opened ``NvmlSampler``; no NVML here is a one-line error (exit 69)."""

    def __init__(self, job_id: str) -> None:
        from hpcserve.telemetry.nvml import NvmlSampler

        logging.basicConfig(level=logging.INFO, format="hpcserve: %(message)s")  # a device skipped, and why
        self.sampler = NvmlSampler(job_id)

    def __enter__(self) -> NvmlSampler:
        return self.sampler.open()

    def __exit__(self, *exc: object) -> None:
        self.sampler.close()


def _emit(sampler: NvmlSampler, samples: list[GpuSample], as_json: bool) -> None:
    from hpcserve.telemetry.batching import sample_json

    names = {d.uuid: d.name for d in sampler.devices}
    if as_json:
        from hpcserve.cli.output import emit_json

        rows: list[dict[str, Any]] = [
            {**sample_json(s), "job_id": s.job_id, "name": names.get(s.gpu_uuid, "")} for s in samples
        ]
        emit_json(rows)
        sys.stdout.flush()
        return
    from hpcserve.cli.output import emit_table

    table = [(s.gpu_index, s.gpu_uuid, names.get(s.gpu_uuid, ""), f"{s.util_pct:g}", _gib(s.mem_used_bytes),
              _gib(s.mem_total_bytes), s.power_w, s.sm_clock_mhz) for s in samples]  # fmt: skip
    emit_table(f"{len(samples)} GPUs, driver {sampler.driver or '?'}", COLUMNS, table)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"
