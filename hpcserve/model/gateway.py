"""What the gateway's pure decisions (routing, tenancy) read: the deployment snapshot and the API key.

Pure: no I/O imports (import-linter checks it). ``hpcserve.serving.gateway.routes`` and ``.keys``
re-export these names, next to the sources that read them from files and the database.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec

NO_GROUPS: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One READY replica: ``url`` is its base URL (``http://host:port``, no ``/v1``); ``key`` the engine key
    the gateway sends it as ``Authorization: Bearer`` (None: the engine wants none)."""

    deployment: str
    replica: int
    url: str
    key: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class DeploymentRoute:
    """A known deployment. No endpoints means scaled to zero: its requests wait in the buffer.

    ``draining`` replicas finish what they have and get nothing new. ``max_prompt_tokens`` and
    ``max_tokens`` override the gateway's defaults for this deployment. ``owner`` and ``shares`` decide
    which keys reach it (tenancy.py); no owner: every key.
    """

    name: str
    endpoints: tuple[Endpoint, ...] = ()
    draining: frozenset[int] = frozenset()
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None
    owner: str | None = None
    shares: frozenset[str] = frozenset()

    def ready(self) -> tuple[Endpoint, ...]:
        """Endpoints that may take new requests."""
        if not self.draining:
            return self.endpoints
        return tuple(e for e in self.endpoints if e.replica not in self.draining)


Routes = Mapping[str, DeploymentRoute]


class ApiKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A key the gateway takes: an entry of the keys file (``sha256``) or a service-made key (``salt``
    and ``digest``). ``models`` None: every model the owner may reach."""

    id: str
    owner: str
    sha256: str = ""
    rate: float | None = None
    burst: float | None = None
    max_tokens: int | None = None
    models: frozenset[str] | None = None
    salt: str = ""
    digest: str = ""
