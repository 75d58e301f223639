"""Telemetry inside callables: ``WithTelemetry(fn)`` runs ``fn`` with a reporter thread beside it, on the
first task of each node (the tasks of a node see the same GPUs). submitit's ``checkpoint`` of ``fn`` stays
visible, and the call it returns for the requeued job is wrapped again (as ``WithTorchEnv`` does)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from hpcserve.jobs.wrapping import JobWrapper


def wanted(job_env: Mapping[str, str]) -> bool:
    """Whether a job submitted now reports: not when the job's env or the submitter's opts out."""
    from hpcserve.telemetry.reporter import ENABLE_ENV, enabled

    return enabled({ENABLE_ENV: job_env.get(ENABLE_ENV, os.environ.get(ENABLE_ENV, "1"))})


def job_id_here() -> str:
    """This job's id as the service knows it (an array task has its own)."""
    return os.environ.get("SLURM_JOB_ID", "")


class WithTelemetry(JobWrapper):
    """``fn`` called with the job's GPUs sampled and reported in the background (see the module doc)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        reporter = None
        if os.environ.get("SLURM_LOCALID", "0") == "0":
            from hpcserve.telemetry.reporter import start_reporter

            reporter = start_reporter(job_id_here())
        try:
            return self.fn(*args, **kwargs)
        finally:
            if reporter is not None:
                reporter.stop()
