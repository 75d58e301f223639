"""Validated, frozen site config and policy, loaded explicitly from YAML (never at import time)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hpcserve.config.base import HostList, Invalid
    from hpcserve.config.loader import load_policy, load_site_config
    from hpcserve.config.policy import JobClass, JobClassName, Policy, check_policy
    from hpcserve.config.sections import (
        DEFAULT_DATABASE_URL,
        DatabaseSettings,
        Fabric,
        FabricKind,
        ManagedPool,
        NodeGroup,
        Partition,
        Partitions,
        ServiceSettings,
        SlurmSettings,
        Storage,
        StorageTier,
        Switch,
    )
    from hpcserve.config.site import SiteConfig

# Loaded on first use, so importing the pure models (``hpcserve.config.site``, ``.sections``, ``.policy``)
# through this package does not load the YAML loader.
_WHERE = {
    "HostList": "base",
    "Invalid": "base",
    "load_policy": "loader",
    "load_site_config": "loader",
    "JobClass": "policy",
    "JobClassName": "policy",
    "Policy": "policy",
    "check_policy": "policy",
    "SiteConfig": "site",
}  # fmt: skip  (every other name in __all__ is in .sections)

__all__ = [
    "DEFAULT_DATABASE_URL",
    "DatabaseSettings",
    "Fabric",
    "FabricKind",
    "HostList",
    "Invalid",
    "JobClass",
    "JobClassName",
    "ManagedPool",
    "NodeGroup",
    "Partition",
    "Partitions",
    "Policy",
    "ServiceSettings",
    "SiteConfig",
    "SlurmSettings",
    "Storage",
    "StorageTier",
    "Switch",
    "check_policy",
    "load_policy",
    "load_site_config",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_WHERE.get(name, 'sections')}")
    return getattr(module, name)
