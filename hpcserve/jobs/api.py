"""``submit_callable``: the Python API for running a function as a Slurm job, with hpcserve's policy and
placement. The config is loaded here, explicitly, from the arguments or HPCSERVE_SITE / HPCSERVE_POLICY."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcserve.errors import ValidationError
from hpcserve.identity import current_user

if TYPE_CHECKING:
    import submitit

    from hpcserve.config import Policy, SiteConfig
    from hpcserve.slurm.protocol import SlurmClient


def submit_callable(
    fn: Callable[..., Any],
    *args: Any,
    job_class: str = "training",
    nodes: int = 1,
    gpus_per_node: int = 0,
    tasks_per_node: int = 1,
    time: str | None = None,
    name: str | None = None,
    sweep: Sequence[tuple[Any, ...]] | None = None,
    folder: str | Path = "hpcserve-jobs",
    site: SiteConfig | str | Path | None = None,
    policy: Policy | str | Path | None = None,
    client: SlurmClient | None = None,
) -> list[submitit.Job[Any]]:
    """Run ``fn(*args)`` as a Slurm job (or ``fn(*a)`` for each ``a`` in ``sweep``, as one job array).

    Multi-task jobs get the torch.distributed env (``hpcserve.jobs.distributed``); preemptible classes get
    USR2 before the end and are requeued, resuming through submitit's ``Checkpointable``. Returns the
    submitit jobs (one, or one per sweep item): ``job.result()`` waits for the value.
    """
    from hpcserve.config.policy import JobClassName
    from hpcserve.jobs.policy import time_option
    from hpcserve.jobs.spec import JobRequest
    from hpcserve.jobs.submit import Submitter
    from hpcserve.slurm.factory import make_client

    loaded_site, loaded_policy = _load(site, policy)
    request = JobRequest(
        job_class=JobClassName(job_class),
        name=name or str(getattr(fn, "__name__", type(fn).__name__)),
        user=current_user(),
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        tasks_per_node=tasks_per_node,
        time_s=time_option(time) if time else None,
    )
    submitter = Submitter(client or make_client(loaded_site), loaded_site, loaded_policy)
    jobs, _ = submitter.submit_callable(request, fn, args, Path(folder).resolve(), sweep)
    return jobs


def _load(
    site: SiteConfig | str | Path | None, policy: Policy | str | Path | None
) -> tuple[SiteConfig, Policy]:
    from hpcserve.config import Policy, SiteConfig, check_policy, load_policy, load_site_config

    site = site or os.environ.get("HPCSERVE_SITE")
    policy = policy or os.environ.get("HPCSERVE_POLICY")
    if site is None or policy is None:
        raise ValidationError(
            "submit_callable needs a site config and a policy "
            "(fix: pass site= and policy=, or set HPCSERVE_SITE and HPCSERVE_POLICY)"
        )
    loaded_site = site if isinstance(site, SiteConfig) else load_site_config(site)
    if isinstance(policy, Policy):
        return loaded_site, policy
    loaded = load_policy(policy)
    check_policy(loaded, loaded_site, policy)
    return loaded_site, loaded
