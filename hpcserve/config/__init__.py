"""Validated, frozen site config and policy, loaded explicitly from YAML (never at import time)."""

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
