"""Which models a key reaches, decided purely from the key, the routes and its owner's Unix groups.

A key reaches its owner's deployments, plus those whose owners share them with the key's owner: a share
names a user, a Unix group written ``@group`` (the key owner's primary or supplementary groups), or
``all``. A key with ``models`` set is narrowed to those (by served model name or deployment name). A route
with no owner (a routes file or a test that names none) is open to every key. Anything else does not exist
for the key: 404, as OpenAI answers a model you may not use, and it never wakes a deployment at zero.
"""

from __future__ import annotations

from collections.abc import Collection

from hpcserve.model.gateway import ApiKey, DeploymentRoute, Routes

EVERYONE = "all"
GROUP_PREFIX = "@"


def shared_with(shares: Collection[str], user: str, groups: Collection[str]) -> bool:
    """Whether ``shares`` (user names, ``@group`` or ``all``) names ``user`` or one of their ``groups``."""
    for entry in shares:
        if entry in (EVERYONE, user):
            return True
        if entry.startswith(GROUP_PREFIX) and entry[len(GROUP_PREFIX) :] in groups:
            return True
    return False


def may_reach(key: ApiKey, model: str, route: DeploymentRoute, groups: Collection[str]) -> bool:
    """Whether ``key`` (whose owner is in ``groups``) may send requests for ``model``, served by ``route``."""
    if key.models is not None and model not in key.models and route.name not in key.models:
        return False
    if route.owner is None or route.owner == key.owner:
        return True
    return shared_with(route.shares, key.owner, groups)


def reachable(key: ApiKey, routes: Routes, groups: Collection[str]) -> list[str]:
    """The model names ``key`` may ask for, sorted (what ``/v1/models`` lists)."""
    return sorted(model for model, route in routes.items() if may_reach(key, model, route, groups))
