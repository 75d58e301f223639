"""Job submission: templates (sbatch), Python callables (submitit), the policy check, the torch env.

``hpcserve.jobs.submit_callable`` is loaded on first use, so importing this package costs nothing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["submit_callable"]


def __getattr__(name: str) -> Any:
    if name == "submit_callable":
        from hpcserve.jobs.api import submit_callable

        return submit_callable
    raise AttributeError(f"module 'hpcserve.jobs' has no attribute {name!r}")
