"""Build the Slurm client a site config asks for."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpcserve.slurm.cli_backend import CliSlurmClient
from hpcserve.slurm.protocol import SlurmClient
from hpcserve.slurm.runner import DEFAULT_TIMEOUT_S

if TYPE_CHECKING:
    from hpcserve.config import SiteConfig


def make_client(site: SiteConfig | None) -> SlurmClient:
    """The CLI backend by default; the pyslurm backend for reads when the site sets ``slurm.backend: pyslurm``
    (its writes still go through the CLI backend)."""
    timeout = site.slurm.command_timeout_s if site else DEFAULT_TIMEOUT_S
    cli = CliSlurmClient(timeout=timeout)
    if site is None or site.slurm.backend == "cli":
        return cli
    from hpcserve.slurm.pyslurm_backend import PyslurmClient

    return PyslurmClient(delegate=cli)
