"""API keys: who may call the gateway, how fast, and how many tokens a request may ask for.

The keys file (YAML or JSON) holds the sha256 of each key, never the key::

    keys:
      - id: alice-laptop        # the label in metrics and usage rows (unique)
        owner: alice            # a user or a team (a Slurm account, for accounting)
        sha256: 5e884898da28...  # hex sha256 of the key: `echo -n "$KEY" | hpcserve gateway --hash-key`
        rate: 200               # tokens/s refilled into the key's bucket (optional: unlimited)
        burst: 8000             # bucket size in tokens (optional: 60 s of rate)
        max_tokens: 2048        # cap on a request's max_tokens (optional: the deployment's cap)

Clients send ``Authorization: Bearer <key>``. A request costs its estimated prompt tokens plus its
(clamped) max_tokens when admitted; when the real usage is known the difference is given back (or taken).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import msgspec

from hpcserve.errors import ConfigError

BURST_SECONDS = 60.0


def hash_key(key: str) -> str:
    """The hex sha256 of an API key, as the keys file stores it."""
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One entry of the keys file (see the module docstring)."""

    id: str
    owner: str
    sha256: str
    rate: float | None = None
    burst: float | None = None
    max_tokens: int | None = None


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
    bad = next((k.id for k in keys if len(k.sha256) != 64 or (k.rate is not None and k.rate <= 0)), None)
    if bad is not None:
        raise ConfigError(where, f"keys[id={bad}]", "sha256 must be 64 hex digits and rate > 0")
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
    """Keys by hash, and a bucket per rate-limited key: fixed at start, never grown by requests."""

    def __init__(self, keys: Sequence[ApiKey], now: float) -> None:
        self.keys = tuple(keys)
        self._by_hash = {k.sha256.lower(): k for k in keys}
        self._seen: dict[str, ApiKey] = {}  # Authorization headers already found (valid keys only)
        self._buckets = {
            k.id: TokenBucket(k.rate, k.burst or k.rate * BURST_SECONDS, now) for k in keys if k.rate
        }

    def find(self, authorization: str | None) -> ApiKey | None:
        """The key a ``Bearer`` Authorization header names, or None when absent or unknown."""
        if not authorization:
            return None
        key = self._seen.get(authorization)
        if key is not None or not authorization.startswith("Bearer "):
            return key
        key = self._by_hash.get(hash_key(authorization[7:].strip()))
        if key is not None and len(self._seen) < 4 * len(self.keys) + 16:
            self._seen[authorization] = key
        return key

    def take(self, key: ApiKey, cost: float, now: float) -> int:
        """0 when admitted, else the whole seconds to put in Retry-After (at least 1)."""
        bucket = self._buckets.get(key.id)
        wait = bucket.take(cost, now) if bucket else 0.0
        return max(1, math.ceil(wait)) if wait > 0 else 0

    def settle(self, key: ApiKey, charged: float, used: float, now: float) -> None:
        bucket = self._buckets.get(key.id)
        if bucket is not None:
            bucket.settle(charged, used, now)
