"""hpcserve's own database: history samples, deployments and replicas, rebalance plans, usage.

``HistoryStore(url)`` is the whole interface; ``hpcserve db upgrade`` (or ``HistoryStore.upgrade()``) brings
the schema to the newest migration.
"""

from hpcserve.store.errors import (
    DatabaseUnavailable,
    DeploymentExists,
    NotFound,
    NotOwner,
    SchemaOutOfDate,
    ServedNameTaken,
    StoreError,
)
from hpcserve.store.records import (
    Deployment,
    EngineSample,
    GpuSampleRecord,
    LostWork,
    NewStep,
    Plan,
    QueueSample,
    Replica,
    RetentionResult,
    Rollup,
    SchemaStatus,
    Step,
    Usage,
)
from hpcserve.store.store import HistoryStore

__all__ = [
    "DatabaseUnavailable",
    "Deployment",
    "DeploymentExists",
    "EngineSample",
    "GpuSampleRecord",
    "HistoryStore",
    "LostWork",
    "NewStep",
    "NotFound",
    "NotOwner",
    "Plan",
    "QueueSample",
    "Replica",
    "RetentionResult",
    "Rollup",
    "SchemaOutOfDate",
    "SchemaStatus",
    "ServedNameTaken",
    "Step",
    "StoreError",
    "Usage",
]
