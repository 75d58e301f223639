"""Gateway API keys and their usage: what a caller may make, see and revoke.

A key is ``hpk_<id>_<secret>``, shown once, at create; the store keeps a random salt and the HMAC-SHA256 of
the secret under it (``hpcserve.serving.gateway.keys``), never the key. A caller lists, revokes and reads
the usage of their own keys; admins (the service's ``admins``) may list all and revoke any.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from hpcserve.api.caller import Caller, is_admin
from hpcserve.errors import ValidationError
from hpcserve.model.gateway import PRIORITIES, Priority
from hpcserve.serving.gateway.keys import new_secret
from hpcserve.store.records import ApiKeyRecord, Usage

if TYPE_CHECKING:
    from hpcserve.api.context import ApiContext

MAX_LIVE_KEYS = 50  # per user: the gateway holds every live key in memory
MAX_MODELS = 64
NAME_CHARS = 128
MAX_DAYS = 3660


@dataclass(frozen=True, slots=True)
class KeyRequest:
    """What ``keys create`` asks for, checked: ``models`` None means every model the owner may reach."""

    label: str = ""
    models: tuple[str, ...] | None = None
    rate: float | None = None
    burst: float | None = None
    max_tokens: int | None = None
    priority: Priority = "interactive"
    allow_fallback: bool = False


FIELDS = ("name", "models", "rate", "burst", "max_tokens", "priority", "allow_fallback")


def parse_key_request(body: Mapping[str, Any]) -> KeyRequest:
    """A ``KeyRequest`` from a JSON body; ``ValidationError`` naming the field and the fix otherwise."""
    unknown = set(body) - set(FIELDS)
    if unknown:
        raise ValidationError(f"unknown key fields {sorted(unknown)}: use {', '.join(FIELDS)}")
    rate, burst = _positive(body, "rate"), _positive(body, "burst")
    if burst is not None and rate is None:
        raise ValidationError("burst: a burst needs a rate (fix: pass --rate TOKENS_PER_S too)")
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
        raise ValidationError(f"max_tokens: {max_tokens!r} is not a positive integer")
    allow_fallback = body.get("allow_fallback", False)
    if not isinstance(allow_fallback, bool):
        raise ValidationError(f"allow_fallback: {allow_fallback!r} is not true or false")
    return KeyRequest(_label(body.get("name")), _models(body.get("models")), rate, burst, max_tokens,
                      _priority(body.get("priority")), allow_fallback)  # fmt: skip


def _priority(value: object) -> Priority:
    if value is None:
        return "interactive"
    for priority in PRIORITIES:
        if value == priority:
            return priority
    raise ValidationError(f"priority: {value!r} is not a priority class (fix: {' or '.join(PRIORITIES)})")


def _label(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > NAME_CHARS or not value.isprintable():
        raise ValidationError(f"name: give a printable label of at most {NAME_CHARS} characters")
    return value


def _models(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or len(value) > MAX_MODELS:
        raise ValidationError(f"models: give 1 to {MAX_MODELS} model names (--models M1,M2)")
    for name in value:
        if not isinstance(name, str) or not name or len(name) > NAME_CHARS or not name.isprintable():
            raise ValidationError(
                f"models: {name!r} is not a model name (served model names, comma-separated)"
            )
    return tuple(dict.fromkeys(value))


def _positive(body: Mapping[str, Any], field: str) -> float | None:
    value = body.get(field)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValidationError(f"{field}: {value!r} is not a positive number of tokens per second")
    return float(value)


def create_key(api: ApiContext, caller: Caller, request: KeyRequest) -> tuple[ApiKeyRecord, str]:
    """Store a new key of the caller's; returns it and the key itself (the only time it is seen)."""
    live = api.store.api_keys(caller.user, live_only=True)
    if len(live) >= MAX_LIVE_KEYS:
        raise ValidationError(
            f"keys: {caller.user} has {len(live)} live keys, the most allowed (fix: revoke one with "
            "`hpcserve keys revoke ID`)"
        )
    secret = new_secret()
    record = ApiKeyRecord(
        id=secret.key_id, owner=caller.user, label=request.label, salt=secret.salt, digest=secret.digest,
        models=list(request.models) if request.models is not None else None, rate=request.rate,
        burst=request.burst, max_tokens=request.max_tokens, created_at=api.clock(),
        priority=request.priority, allow_fallback=request.allow_fallback,
    )  # fmt: skip
    return api.store.add_api_key(record), secret.key


def list_keys(api: ApiContext, caller: Caller, everyone: bool = False) -> list[ApiKeyRecord]:
    """The caller's keys, revoked ones included; every user's for an admin who asks."""
    if everyone:
        _require_admin(api, caller, "list every user's keys")
        return api.store.api_keys()
    return api.store.api_keys(caller.user)


def revoke_key(api: ApiContext, caller: Caller, key_id: str) -> ApiKeyRecord:
    """Revoke one of the caller's keys (an admin: anyone's); the gateway drops it within seconds."""
    return api.store.revoke_api_key(key_id, user=caller.user, admin=is_admin(caller, api.site.admins))


def usage(
    api: ApiContext, caller: Caller, since_days: float | None = None, everyone: bool = False
) -> list[Usage]:
    """Per day, key and model: the caller's keys' usage (every key's for an admin who asks)."""
    since = None
    if since_days is not None:
        if not 0 <= since_days <= MAX_DAYS:
            raise ValidationError(f"since: {since_days:g} days is out of range (fix: 0 to {MAX_DAYS})")
        since = (api.clock() - timedelta(days=since_days)).date()
    if everyone:
        _require_admin(api, caller, "read every user's usage")
        return api.store.usage_of(None, since)
    return api.store.usage_of([k.id for k in api.store.api_keys(caller.user)], since)


def _require_admin(api: ApiContext, caller: Caller, what: str) -> None:
    from hpcserve.api.errors import Forbidden

    if not is_admin(caller, api.site.admins):
        raise Forbidden(f"only a site admin may {what}; {caller.user} is not one (drop --all)")


def key_view(record: ApiKeyRecord) -> dict[str, Any]:
    """What callers see of a stored key: never its salt or digest."""
    return {
        "id": record.id, "owner": record.owner, "name": record.label, "models": record.models,
        "rate": record.rate, "burst": record.burst, "max_tokens": record.max_tokens,
        "priority": record.priority, "allow_fallback": record.allow_fallback,
        "created_at": record.created_at.isoformat(),
        "revoked_at": record.revoked_at.isoformat() if record.revoked_at else None,
    }  # fmt: skip


def usage_view(row: Usage) -> dict[str, Any]:
    return {"key_id": row.key_id, "model": row.model, "day": row.day.isoformat(), "requests": row.requests,
            "prompt_tokens": row.prompt_tokens, "completion_tokens": row.completion_tokens}  # fmt: skip
