"""The types that decision code shares, with no I/O: import-linter (pyproject.toml) checks that nothing here
imports hpcserve outside this package, or subprocess, sockets, databases, HTTP clients, YAML or click.

- ``cluster``: the Slurm cluster snapshot (``ClusterSnapshot``, ``Node``, ``Job``, ``JobState``,
  ``Partition``, ``Topology``...), built by the backends in ``hpcserve.slurm``;
- ``rebalance``: the rebalancer's decisions (``Side``, ``NodeMove``, ``Demand``, ``RebalancePlan``);
- ``gateway``: what routing and tenancy read (``Endpoint``, ``DeploymentRoute``, ``Routes``, ``ApiKey``).

The old paths (``hpcserve.slurm.models``, ``hpcserve.rebalance.types``, ``hpcserve.serving.gateway.routes``
and ``.keys``) re-export the same objects.
"""
