"""``hpcserve ps --json`` without click: the command scripts and dashboards run in loops.

The entry point has already started squeue (see entry.py). This path only parses its lines, adds the
service's GPU figures (``ps_telemetry``: stdlib only, fetched meanwhile) and writes the JSON that the click
command writes (a test checks they agree), then leaves without interpreter teardown:
by then the output is flushed and the process holds nothing else, while freeing 10,000 job records one by
one would cost about as much as encoding them.
"""

from __future__ import annotations

import gc
import os
import sys

from hpcserve.errors import HpcserveError
from hpcserve.slurm.runner import SubprocessRunner


def ps_json(runner: SubprocessRunner) -> None:
    """Print every job as JSON and exit: 0, or the error's exit code after one line on stderr."""
    from hpcserve.cli.ps_telemetry import annotate, fetched, start

    pending = start()  # the service's GPU figures, fetched on a thread while squeue runs (none: no socket)
    from hpcserve.inventory import jobs_json
    from hpcserve.slurm.cli_backend import CliSlurmClient

    gc.disable()  # a short-lived process building 10,000 records: the cycle collector only costs time
    try:
        jobs = list(CliSlurmClient(runner).iter_jobs(None))
        data = jobs_json(annotate(jobs, fetched(pending)))
    except HpcserveError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(exc.exit_code)
    try:
        sys.stdout.buffer.write(data + b"\n")
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. `hpcserve ps --json | head -c 100`: the reader has what it wanted
        os._exit(0)
    os._exit(0)
