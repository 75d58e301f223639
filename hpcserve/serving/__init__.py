"""Serving: deployment specs, the vllm command, replicas as Slurm jobs, the engine simulator, the gateway and
the autoscaler."""
