"""The store's errors: each says what failed and what to do about it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from hpcserve.errors import HpcserveError


class StoreError(HpcserveError):
    """A database operation failed."""


class DatabaseUnavailable(StoreError):
    """The database could not be reached or refused the operation."""

    def __init__(self, url: str, problem: str) -> None:
        super().__init__(
            f"database {redact(url)}: {problem} (fix: check database.url in the site config; SQLite needs "
            "a writable folder, PostgreSQL a running server and a known user)"
        )


class SchemaOutOfDate(StoreError):
    """The database's schema is not the one this hpcserve ships (empty, or behind): nothing is migrated
    implicitly; an admin runs ``hpcserve db upgrade`` (``hpcserve service`` also migrates at start)."""

    def __init__(self, url: str, current: str | None, head: str) -> None:
        self.current, self.head = current, head
        where = "is empty (no hpcserve schema)" if current is None else f"is at schema revision {current}"
        super().__init__(
            f"database {redact(url)} {where}, this hpcserve needs {head} (fix: an admin runs "
            "`hpcserve db upgrade`, or starts `hpcserve service`, which migrates at start)"
        )


class NotOwner(StoreError):
    """A user tried to change a deployment that is neither theirs nor theirs to administer."""

    exit_code = 77  # EX_NOPERM

    def __init__(self, deployment: str, owner: str, user: str) -> None:
        self.deployment, self.owner, self.user = deployment, owner, user
        super().__init__(
            f"deployment {deployment!r} belongs to {owner}, not {user}: only its owner or a site admin "
            "(`admins` in the site config) may change it"
        )


class DeploymentExists(StoreError):
    def __init__(self, name: str, stopping: bool) -> None:
        if stopping:
            super().__init__(
                f"deployment {name!r} was deleted and its replicas are still stopping: retry when "
                "`hpcserve deployments` no longer lists it"
            )
        else:
            super().__init__(f"deployment {name!r} exists: pick another name, or `hpcserve scale` it")


class ServedNameTaken(StoreError):
    """Another deployment already serves this model name (names are unique across all users)."""

    exit_code = 2

    def __init__(self, served: str, holder: str | None) -> None:
        by = f" by deployment {holder!r}" if holder else ""
        super().__init__(
            f"served_model_name: {served!r} is already served{by} (fix: pick another --served-model-name)"
        )


class NotFound(StoreError):
    """A deployment, replica, plan or step that the call names does not exist."""

    exit_code = 3


def redact(url: str) -> str:
    """The URL with any password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable URL>"


@contextmanager
def reported(url: str) -> Iterator[None]:
    """Turn a driver's error into a one-line ``DatabaseUnavailable`` (for the CLI's database commands)."""
    try:
        yield
    except DBAPIError as exc:
        lines = str(exc.orig).strip().splitlines() or [type(exc.orig).__name__]
        raise DatabaseUnavailable(url, lines[0]) from exc
