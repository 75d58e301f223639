"""What the gateway knows about deployments: the snapshot types (from hpcserve.model.gateway), and sources.

A *source* is any ``refresh() -> Mapping[str, DeploymentRoute]``: model name (the deployment's name, its
served name, aliases) to the deployment with its READY endpoints. The gateway calls it every ~0.5 s in a
worker thread. ``StaticRoutes`` serves tests and benches; ``routes_from_file`` reads a routes file::

    deployments:
      - name: llama-8b                       # the deployment; /v1/models lists every name and alias
        aliases: [meta-llama/Llama-3.1-8B-Instruct]
        max_prompt_tokens: 8192              # optional: larger prompts get 413
        max_tokens: 2048                     # optional: max_tokens is clamped to this
        owner: alice                         # optional: only her keys (and those she shares with) reach it
        shares: [bob, "@ml-team"]            # optional: users, @groups or "all" whose keys reach it too
        max_concurrency: 32                  # optional: requests per replica at once; more wait here
        interactive_reserve: 4               # optional: of those, slots only interactive keys take
        shed_wait_s: 20                      # optional: 503 past this expected wait (batch first)
        max_replicas: 2                      # optional: below it, nothing is shed (the autoscaler adds)
        fallback: llama-1b                   # optional: where keys with allow_fallback go when overloaded
        fallback_wait_s: 5                   # optional: past this expected wait (default: shed_wait_s)
        overload_max_tokens: 256             # optional: max_tokens cap while requests wait here
        replicas:                            # READY replicas only; none = scaled to zero (requests wait)
          - {replica: 0, url: "http://node1:8001"}
          - {replica: 1, url: "http://node2:8001", draining: true}   # finishes its requests, gets no new
          - {replica: 2, url: "http://node3:8001", engine_key: "..."}  # sent upstream as the Bearer token
          - {replica: 3, url: "http://node4:8001", agent: "http://node4:8000"}  # sleep mode: woken first

A replica's ``engine_key`` (optional) is what its engine requires on /v1 (vLLM's ``--api-key``): the
gateway sends ``Authorization: Bearer <engine_key>`` to it, never the client's own key. A replica's
``agent`` (optional) is the base URL of its replica agent: its engine has sleep mode, and the gateway wakes
it through the agent before sending to it (wake.py). JSON with the same shape works too. The file is
re-read when its mtime or size changes; a file that stops parsing keeps the last good routes (and logs
why).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import msgspec

from hpcserve.errors import ConfigError
from hpcserve.model.gateway import DeploymentRoute as DeploymentRoute
from hpcserve.model.gateway import Endpoint as Endpoint
from hpcserve.model.gateway import Overload as Overload
from hpcserve.model.gateway import Routes as Routes

log = logging.getLogger(__name__)


ENGINE_KEY_PATTERN = r"\A[A-Za-z0-9._~+/=-]{1,256}\Z"  # RFC 6750's b64token: one header value, no CR/LF


Refresh = Callable[[], Routes]


def index_routes(
    routes: Iterable[DeploymentRoute], aliases: Mapping[str, Iterable[str]] | None = None
) -> Routes:
    """The lookup table: each deployment under its name and its aliases (a name wins over an alias)."""
    table: dict[str, DeploymentRoute] = {}
    listed = list(routes)
    for route in listed:
        for alias in (aliases or {}).get(route.name, ()):
            table[alias] = route
    table.update({route.name: route for route in listed})
    return table


@dataclass(slots=True)
class StaticRoutes:
    """A source that returns what it was given; ``set`` swaps the deployments (tests, benches)."""

    routes: Routes = field(default_factory=dict)

    @classmethod
    def of(cls, *routes: DeploymentRoute) -> StaticRoutes:
        return cls(index_routes(routes))

    def set(self, *routes: DeploymentRoute) -> None:
        self.routes = index_routes(routes)

    def __call__(self) -> Routes:
        return self.routes


class _ReplicaEntry(msgspec.Struct, forbid_unknown_fields=True):
    replica: int
    url: str
    draining: bool = False
    engine_key: Annotated[str, msgspec.Meta(pattern=ENGINE_KEY_PATTERN)] | None = None
    agent: str | None = None


class _DeploymentEntry(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    replicas: list[_ReplicaEntry] = []
    aliases: list[str] = []
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None
    owner: str | None = None
    shares: list[str] = []
    max_concurrency: Annotated[int, msgspec.Meta(ge=1)] | None = None
    interactive_reserve: Annotated[int, msgspec.Meta(ge=0)] = 0
    shed_wait_s: Annotated[float, msgspec.Meta(ge=0)] | None = None
    max_replicas: Annotated[int, msgspec.Meta(ge=1)] | None = None
    fallback: str | None = None
    fallback_wait_s: Annotated[float, msgspec.Meta(ge=0)] | None = None
    overload_max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None

    def overload(self) -> Overload:
        return Overload(self.max_concurrency, self.interactive_reserve, self.shed_wait_s, self.max_replicas,
                        self.fallback, self.fallback_wait_s, self.overload_max_tokens)  # fmt: skip


class _RoutesFile(msgspec.Struct, forbid_unknown_fields=True):
    deployments: list[_DeploymentEntry] = []


def parse_routes(data: object, where: str = "routes") -> Routes:
    """Routes from a loaded routes document (see the module docstring); ConfigError names the field."""
    try:
        doc = msgspec.convert(data, _RoutesFile)
    except msgspec.ValidationError as err:
        raise ConfigError(
            where, "", str(err), "see hpcserve/serving/gateway/routes.py for the format"
        ) from None
    routes = [_route(d) for d in doc.deployments]
    return index_routes(routes, {d.name: d.aliases for d in doc.deployments})


def _route(entry: _DeploymentEntry) -> DeploymentRoute:
    endpoints = tuple(
        Endpoint(entry.name, r.replica, r.url.rstrip("/"), r.engine_key, r.agent and r.agent.rstrip("/"))
        for r in entry.replicas
    )
    draining = frozenset(r.replica for r in entry.replicas if r.draining)
    return DeploymentRoute(entry.name, endpoints, draining, entry.max_prompt_tokens, entry.max_tokens,
                           entry.owner, frozenset(entry.shares), entry.overload())  # fmt: skip


def load_routes(path: Path) -> Routes:
    """Read and parse a routes file (YAML, or JSON, which YAML reads too)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(str(path), "", f"cannot read routes: {err}") from None
    return parse_routes(data, str(path))


class FileRoutes:
    """A source over a routes file, re-read only when its mtime or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._routes: Routes = {}

    def load(self) -> Routes:
        """Read the file now; ConfigError if it cannot be read or parsed."""
        self._stamp = self._stamp_now()  # before parsing: a bad file is reported once, not every poll
        self._routes = load_routes(self.path)
        return self._routes

    def _stamp_now(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def __call__(self) -> Routes:
        if self._stamp_now() == self._stamp:
            return self._routes
        try:
            self.load()
        except ConfigError as err:
            log.warning("%s; keeping the last routes", err)
        return self._routes


def routes_from_file(path: Path | str) -> Refresh:
    """A refresh callable for ``--routes FILE``. Raises ConfigError now if the file is unreadable."""
    source = FileRoutes(Path(path))
    source.load()  # fail at start, not in the background loop
    return source
