"""Rebalancing nodes between the training and inference partitions: forecast, planner (pure), executor."""
