"""The API layer's refusals (the service maps them to 401 and 403; the CLI exits with their codes)."""

from __future__ import annotations

from hpcserve.errors import HpcserveError


class Unauthenticated(HpcserveError):
    """A request with no identity the service can trust."""

    exit_code = 77  # EX_NOPERM


class Forbidden(HpcserveError):
    """The caller is known, and this is not theirs to do."""

    exit_code = 77
