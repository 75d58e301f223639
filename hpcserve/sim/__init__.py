"""Trace-driven simulation: replay a training-job trace and an inference-arrival trace on a site config
and compare node-split policies, with the service's own decision code where it exists:
``placement.select_nodes`` for training jobs, ``serving.autoscaler.decide`` for replicas, and
``rebalance.planner.plan_rebalance`` (with ``rebalance.forecast``) for the split.

Modules (imports point down this list):
- ``compare``: ``run_policies(Inputs, names)`` -> one ``PolicyResult`` per policy (the CLI's and the
  benchmark's entry point); ``POLICIES`` = static, reactive, predictive, oracle (the perfect-foresight
  split); ``EXTRA``: planner-foresight (the planner told the true future);
- ``engine``: ``Replay(scenario, policy).run()``: the event loop, node moves, preemptions, figures;
- ``planned``: reactive / predictive / planner-foresight = the planner told the demand now / the forecast /
  the truth;
- ``policies``: the ``SplitPolicy`` protocol, ``SplitView``, ``SplitDecision``, the static split and the
  oracle's (``IdealSplit``);
- ``snapshot``: the replay as a ``ClusterSnapshot`` (what the planner reads);
- ``training``: FIFO + EASY backfill, placement, preemption with checkpoints;
- ``inference``: the fluid request model, replicas, the autoscaler;
- ``scenario``: settings, the site's sides, both workloads scaled to the site; ``metrics``, ``report``;
- ``traces``: CSV readers and the scaling rules.

Approximations (each module says more): inference is a fluid model per 1 s step (Poisson counts per step,
FIFO cohorts, waits counted to the step), not per request; a replica's capacity is its saturated
throughput under the engine simulator's latency model; ServeGen's 10-minute rates are interpolated
linearly (no burstiness inside a window); training run times are known exactly (backfill estimates,
time limits); the autoscaler ticks every 10 s and the planner every 60 s; a node move takes the jobs'
grace, then ``move_delay_s``. Deterministic: the same inputs and seed give the same figures.
"""
