"""The rebalancer's decision types, now in ``hpcserve.model.rebalance`` (pure, no I/O); re-exported here so
the old import path keeps working. New code imports from ``hpcserve.model``."""

from hpcserve.model.rebalance import Demand, NodeMove, RebalancePlan, Side

__all__ = ["Demand", "NodeMove", "RebalancePlan", "Side"]
