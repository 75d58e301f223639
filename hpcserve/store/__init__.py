"""hpcserve's own database: history samples, deployments and replicas, rebalance plans, usage."""
