"""What the gateway's pure decisions (routing, tenancy) read: the deployment snapshot and the API key.

Pure: no I/O imports (import-linter checks it). ``hpcserve.serving.gateway.routes`` and ``.keys``
re-export these names, next to the sources that read them from files and the database.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import msgspec

NO_GROUPS: frozenset[str] = frozenset()
Priority = Literal["interactive", "batch"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "batch")  # the order the gateway's queue serves them


@dataclass(frozen=True, slots=True)
class Overload:
    """How a deployment behaves when its replicas are saturated (gateway/overload.py decides).

    ``max_concurrency``: requests one replica is sent at once (None: no bound, nothing waits in the
    gateway); past it requests wait in the gateway, interactive first, then batch. ``interactive_reserve``:
    of those, slots per replica that only interactive requests take. ``shed_wait_s``: a request whose
    expected wait passes it is answered 503 (batch first) once the deployment runs ``max_replicas``
    (None: the gateway cannot know, so it counts as at its maximum); None: never shed. ``fallback``: the
    deployment a key with ``allow_fallback`` is sent to when the expected wait passes ``fallback_wait_s``.
    ``max_tokens``: the cap on max_tokens while requests wait for a slot.
    """

    max_concurrency: int | None = None
    interactive_reserve: int = 0
    shed_wait_s: float | None = None
    max_replicas: int | None = None
    fallback: str | None = None
    fallback_wait_s: float | None = None
    max_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One READY replica: ``url`` is its base URL (``http://host:port``, no ``/v1``); ``key`` the engine key
    the gateway sends it as ``Authorization: Bearer`` (None: the engine wants none). ``agent``: the base
    URL of the replica's agent when its engine has sleep mode (a warm-tier or pool replica): the gateway
    makes sure the engine is awake through it before sending (gateway/wake.py); None: always awake."""

    deployment: str
    replica: int
    url: str
    key: str | None = field(default=None, repr=False)
    agent: str | None = None


@dataclass(frozen=True, slots=True)
class DeploymentRoute:
    """A known deployment. No endpoints means scaled to zero: its requests wait in the buffer.

    ``draining`` replicas finish what they have and get nothing new. ``max_prompt_tokens`` and
    ``max_tokens`` override the gateway's defaults for this deployment. ``owner`` and ``shares`` decide
    which keys reach it (tenancy.py); no owner: every key. ``overload``: queueing, shedding and fallback.
    ``tier``: hot, warm, cold or off, as the store keeps it (None: hot, never moved); for the record only.
    """

    name: str
    endpoints: tuple[Endpoint, ...] = ()
    draining: frozenset[int] = frozenset()
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None
    owner: str | None = None
    shares: frozenset[str] = frozenset()
    overload: Overload = Overload()
    tier: str | None = None

    def ready(self) -> tuple[Endpoint, ...]:
        """Endpoints that may take new requests."""
        if not self.draining:
            return self.endpoints
        return tuple(e for e in self.endpoints if e.replica not in self.draining)


Routes = Mapping[str, DeploymentRoute]


class ApiKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A key the gateway takes: an entry of the keys file (``sha256``) or a service-made key (``salt``
    and ``digest``). ``models`` None: every model the owner may reach. ``priority``: batch requests wait
    behind interactive ones and are shed first; ``allow_fallback``: an overloaded deployment may send this
    key's requests to its fallback deployment (one the key reaches too)."""

    id: str
    owner: str
    sha256: str = ""
    rate: float | None = None
    burst: float | None = None
    max_tokens: int | None = None
    models: frozenset[str] | None = None
    salt: str = ""
    digest: str = ""
    priority: Priority = "interactive"
    allow_fallback: bool = False
