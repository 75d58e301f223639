"""API keys: who may call the gateway, which models they reach, how fast, and how many tokens a request
may ask for.

Keys made through the service (``hpcserve keys create``, the default when the gateway runs against a site)
are ``hpk_<id>_<secret>``; the database keeps a random ``salt`` and ``digest`` = hex HMAC-SHA256(salt,
secret), never the key. A keys file (YAML or JSON; tests and standalone gateways) holds the sha256 of each
key instead::

    keys:
      - id: alice-laptop        # the label in metrics and usage rows (unique)
        owner: alice            # the Unix user the key acts for (what it may reach: see tenancy.py)
        sha256: 5e884898da28...  # hex sha256 of the key: `echo -n "$KEY" | hpcserve gateway --hash-key`
        models: [llama-8b]      # optional: only these of the owner's models (default: all they reach)
        rate: 200               # tokens/s refilled into the key's bucket (optional: unlimited)
        burst: 8000             # bucket size in tokens (optional: 60 s of rate)
        max_tokens: 2048        # cap on a request's max_tokens (optional: the deployment's cap)
        priority: batch         # interactive (default) or batch: waits behind interactive, shed first
        allow_fallback: true    # an overloaded deployment may send it to its fallback (default false)

Clients send ``Authorization: Bearer <key>``. A request costs its estimated prompt tokens plus its
(clamped) max_tokens when admitted; when the real usage is known the difference is given back (or taken).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from hpcserve.errors import ConfigError
from hpcserve.model.gateway import NO_GROUPS as NO_GROUPS
from hpcserve.model.gateway import ApiKey as ApiKey

BURST_SECONDS = 60.0
PREFIX = "hpk_"


def hash_key(key: str) -> str:
    """The hex sha256 of an API key, as the keys file stores it."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_digest(salt: str, secret: str) -> str:
    """hex HMAC-SHA256 of a service-made key's secret under its salt (what the database keeps)."""
    return hmac.new(salt.encode(), secret.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class NewSecret:
    """A fresh key: ``key`` is shown once; ``key_id``, ``salt`` and ``digest`` are stored."""

    key_id: str
    salt: str
    digest: str
    key: str


def new_secret() -> NewSecret:
    key_id, secret, salt = secrets.token_hex(8), secrets.token_urlsafe(32), secrets.token_hex(16)
    return NewSecret(key_id, salt, key_digest(salt, secret), f"{PREFIX}{key_id}_{secret}")


def split_key(key: str) -> tuple[str, str] | None:
    """(id, secret) of a ``hpk_<id>_<secret>`` key; None for any other string."""
    if not key.startswith(PREFIX):
        return None
    key_id, sep, secret = key[len(PREFIX) :].partition("_")
    return (key_id, secret) if sep and key_id and secret else None


@dataclass(frozen=True, slots=True)
class KeySnapshot:
    """What a keys source returns: the live keys and the Unix groups of their owners."""

    keys: tuple[ApiKey, ...]
    groups: Mapping[str, frozenset[str]]


KeySource = Callable[[], KeySnapshot]


class _KeysFile(msgspec.Struct, forbid_unknown_fields=True):
    keys: list[ApiKey] = []


def parse_keys(data: object, where: str = "keys") -> list[ApiKey]:
    """Keys from a loaded keys document; ConfigError names the bad field or the duplicate."""
    try:
        keys = msgspec.convert(data, _KeysFile).keys
    except msgspec.ValidationError as err:
        raise ConfigError(
            where, "", str(err), "see hpcserve/serving/gateway/keys.py for the format"
        ) from None
    for field, values in (("id", [k.id for k in keys]), ("sha256", [k.sha256.lower() for k in keys])):
        dup = next((v for v in values if values.count(v) > 1), None)
        if dup is not None:
            raise ConfigError(where, f"keys[].{field}", f"{dup!r} appears more than once")
    bad = next((k.id for k in keys if len(k.sha256) != 64 or k.digest or (k.rate or 1) <= 0), None)
    if bad is not None:
        raise ConfigError(where, f"keys[id={bad}]", "sha256 must be 64 hex digits (no digest) and rate > 0")
    return keys


def load_keys(path: Path) -> list[ApiKey]:
    """Read and parse a keys file."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(str(path), "", f"cannot read keys: {err}") from None
    return parse_keys(data, str(path))


class TokenBucket:
    """Tokens refill at ``rate``/s up to ``burst``; time is passed in, so the bucket is deterministic."""

    __slots__ = ("burst", "level", "rate", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.level, self.stamp = rate, burst, burst, now

    def _fill(self, now: float) -> None:
        self.level = min(self.burst, self.level + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, cost: float, now: float) -> float:
        """Charge ``cost`` (at most ``burst``) and return 0, or charge nothing and return the seconds
        until the bucket would hold it."""
        self._fill(now)
        cost = min(cost, self.burst)
        if self.level >= cost:
            self.level -= cost
            return 0.0
        return (cost - self.level) / self.rate

    def settle(self, charged: float, used: float, now: float) -> None:
        """Give back what was charged but not used (or take the excess; debt is bounded by ``burst``)."""
        self._fill(now)
        self.level = max(-self.burst, min(self.burst, self.level + charged - used))


class Keyring:
    """Keys by id and hash, their owners' Unix groups, and a bucket per rate-limited key. Sized by the keys
    given (``update`` swaps them), never grown by requests: the cache of Authorization headers already
    verified holds valid keys only, at most ``4 x keys + 16``, and loses a key's entries when the key is
    revoked or changed."""

    def __init__(
        self, keys: Sequence[ApiKey], now: float, groups: Mapping[str, frozenset[str]] | None = None
    ) -> None:
        self.keys: tuple[ApiKey, ...] = ()
        self._by_id: dict[str, ApiKey] = {}
        self._by_hash: dict[str, ApiKey] = {}
        self._seen: dict[str, ApiKey] = {}  # Authorization headers already verified
        self._buckets: dict[str, TokenBucket] = {}
        self._groups: Mapping[str, frozenset[str]] = {}
        self.update(keys, groups or {}, now)

    def update(self, keys: Sequence[ApiKey], groups: Mapping[str, frozenset[str]], now: float) -> None:
        """Take a new set of keys: revoked or changed ones stop working at once; unchanged keys keep their
        bucket."""
        self.keys = tuple(keys)
        self._by_id = {k.id: k for k in keys}
        self._by_hash = {k.sha256.lower(): k for k in keys if k.sha256}
        self._seen = {h: k for h, k in self._seen.items() if self._by_id.get(k.id) == k}
        old = self._buckets
        self._buckets = {k.id: _bucket(k, old.get(k.id), now) for k in keys if k.rate}
        self._groups = groups

    def groups(self, owner: str) -> frozenset[str]:
        """The Unix groups of a key's owner (for deployments shared with ``@group``)."""
        return self._groups.get(owner, NO_GROUPS)

    def find(self, authorization: str | None) -> ApiKey | None:
        """The key a ``Bearer`` Authorization header names, or None when absent or unknown."""
        if not authorization:
            return None
        key = self._seen.get(authorization)
        if key is not None or not authorization.startswith("Bearer "):
            return key
        key = self._verify(authorization[7:].strip())
        if key is not None and len(self._seen) < 4 * len(self.keys) + 16:
            self._seen[authorization] = key
        return key

    def _verify(self, token: str) -> ApiKey | None:
        parts = split_key(token)
        if parts is not None:
            key = self._by_id.get(parts[0])
            if (
                key is not None
                and key.digest
                and hmac.compare_digest(key_digest(key.salt, parts[1]), key.digest)
            ):
                return key
        return self._by_hash.get(hash_key(token))

    def take(self, key: ApiKey, cost: float, now: float) -> int:
        """0 when admitted, else the whole seconds to put in Retry-After (at least 1)."""
        bucket = self._buckets.get(key.id)
        wait = bucket.take(cost, now) if bucket else 0.0
        return max(1, math.ceil(wait)) if wait > 0 else 0

    def settle(self, key: ApiKey, charged: float, used: float, now: float) -> None:
        bucket = self._buckets.get(key.id)
        if bucket is not None:
            bucket.settle(charged, used, now)


def _bucket(key: ApiKey, old: TokenBucket | None, now: float) -> TokenBucket:
    assert key.rate is not None
    burst = key.burst or key.rate * BURST_SECONDS
    if old is not None and (old.rate, old.burst) == (key.rate, burst):
        return old
    return TokenBucket(key.rate, burst, now)
