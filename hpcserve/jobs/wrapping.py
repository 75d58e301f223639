"""``JobWrapper``: the base of the callables that run a submitted function inside its job with something
around it (``WithTorchEnv``: the torch.distributed variables; ``WithTelemetry``: a GPU reporter).

A ``checkpoint`` method of the wrapped function (submitit's ``Checkpointable``) stays visible to submitit's
signal handler, and the call it returns for the requeued job is wrapped again, in the same wrapper.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class JobWrapper:
    """Subclasses define ``__call__`` around ``self.fn``."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __getattr__(self, name: str) -> Any:
        if name != "checkpoint" or not hasattr(self.__dict__.get("fn"), "checkpoint"):
            raise AttributeError(name)
        return self._checkpoint

    def _checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        delayed = self.fn.checkpoint(*args, **kwargs)  # type: ignore[attr-defined]
        if delayed is not None:
            delayed.function = type(self)(delayed.function)
        return delayed
