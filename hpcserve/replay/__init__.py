"""Trace-driven simulation: replay a training-job trace and an inference-arrival trace on a site config
and compare node-split policies, with the service's own decision code where it exists:
``placement.select_nodes`` for training jobs, ``serving.autoscaler.decide`` for replicas, and
``rebalance.planner.plan_rebalance`` (with ``rebalance.forecast``) for the split.

Modules (imports point down this list):
- ``compare``: ``run_policies(Inputs, names)`` -> one ``PolicyResult`` per policy (the CLI's and the
  benchmark's entry point); ``POLICIES`` = static, reactive, predictive, oracle (the perfect-foresight
  node-moving split: the best node-moving split, not a lower bound); ``EXTRA``: planner-foresight (the
  planner told the true future) and ``LENDING``: slurm-preempt (the baseline), slurm-preempt-youngest,
  overlap-prewarm (``lending: overlap``), prewarm-foresight, overlap-gentle, lending-bound;
- ``overlap``: lending through Slurm's preemption over overlapping partitions (no node moves), Slurm's
  and hpcserve's victim choice;
- ``floor``: the pre-warm floor's sources (the product's forecast, the recent ramp, the true bursts);
- ``engine``: ``Replay(scenario, policy).run()``: the event loop, node moves, preemptions, figures;
- ``planned``: reactive / predictive / planner-foresight = the planner told the demand now / the forecast /
  the truth;
- ``policies``: the ``SplitPolicy`` protocol, ``SplitView``, ``SplitDecision``, the static split and the
  oracle's (``IdealSplit``);
- ``snapshot``: the replay as a ``ClusterSnapshot`` (what the planner reads);
- ``training``: FIFO + EASY backfill, placement, preemption with checkpoints;
- ``inference``: the fluid request model, replicas, the autoscaler;
- ``scenario``: settings, the site's sides, both workloads scaled to the site; ``metrics``, ``report``;
- ``traces``: CSV readers and the scaling rules;
- apart from those: ``residency`` (with ``residency_model``): where models live, one replica per model vs
  residency tiers vs tiers + pools, over per-model request arrivals (``scripts/bench/residency``).

Approximations (each module says more): inference is a fluid model per 1 s step (Poisson counts per step,
FIFO cohorts, waits counted to the step), not per request; a replica's capacity is its saturated
throughput under the engine simulator's latency model; ServeGen's 10-minute rates are interpolated
linearly (no window's own variability beyond Poisson noise; request traces replay at their real
timestamps, scaled so their busiest 10 s fit the site); training run times are known exactly
(backfill estimates, time limits); the autoscaler ticks every 10 s and the planner every 60 s; a node
move takes the jobs' grace, then ``move_delay_s``. Deterministic: the same inputs and seed give the
same figures.

Simplifications per policy:
- static (context only): a fixed split sized for the replay's inference peak; never moves.
- reactive / moves-predictive (``lending: moves``): whole-node moves within the managed pool, the
  planner every 60 s, its forecast refitted every 30 min of samples (``planned.REFIT_S``), moves carried
  out as named with their grace, then ``move_delay_s``; victims lose their work since the last periodic
  checkpoint (``checkpoint_interval_s``).
- oracle: the best node-moving split (perfect foresight of the rate curve, no planner margins); not a
  bound on lending through preemption, which shares every node.
- slurm-preempt (the baseline): both partitions span every node, inference at the higher tier,
  REQUEUE after ``grace_s``; Slurm's victim order modelled as the multifactor age factor alone (latest
  submission first; ``slurm-preempt-youngest``: latest start first), taken until one node is free; the
  victims lose their work since the last periodic checkpoint (they do not checkpoint on SIGTERM); the
  pending replica is seen every ``autoscale_interval_s`` (not Slurm's sched/backfill cycles); a freed
  node goes to the replica at once and an empty one back to training at once (no epilog/health check).
- overlap-prewarm (``lending: overlap``): the same, plus a replica floor (``floor.RiseRate``), one
  horizon (grace + engine start + two ticks) ahead, over a replica's throughput at ``floor_load`` (the
  autoscaler's scale-up utilisation): the largest of (the last 5 minutes' busiest 10 s + the rise the
  forecast expects over the horizon), the ramp of the last 5 minutes (a rise in each of their thirds,
  extrapolated) and, for bursty traffic only, a standing 0.9 of the forecast peak (weighted by how far
  the last 5 minutes' busiest 10 s rise over their mean: full at 2x, none for smooth traffic). The
  forecast is the product's (``rebalance.forecast.fit`` with the policy's ``prewarm:`` slot and
  half-life, none before ``min_history_s``), fitted on the request rate sampled every
  ``sample_interval_s`` (each sample the busiest 10 s since the last; the product fits engine
  concurrency per controller tick, and its floor is the forecast peak alone: the sim's rule is a
  proposal for it). Gentle victims (least GPU-seconds since their last checkpoint, never a job ending
  within the horizon) checkpoint on the signal in ``checkpoint_save_s`` and lose only that; the signal
  goes out as the floor rises (forecast time minus the grace, approximately: the horizon covers the
  grace).
- prewarm-foresight: the floor set from the true busiest 10 s over the horizon (from the replay's own
  arrivals, Poisson noise included) at ``floor_load``: what a perfect forecast of the peak gives.
- lending-bound: a near-lower bound on lending's cost to training (``compare.lending_bound``): the true
  busiest 10 s of the next two ticks, replicas run full, no replica start, no grace, no lost work, no
  scale-down window; the autoscaler's thresholds and FIFO + backfill still apply (not a strict bound).
Common to all: replicas are whole nodes (8 GPUs, TP 8; no per-GPU packing of replicas beside training
jobs, no TP 1/2/4 replicas); a replica starts in phases: it waits for a node (Slurm's scheduling, seen at
the lending or rebalance tick), the weights are copied from the cold tier to the node's warm tier on
the node's first replica only (``replica_stage_s``; the copy is never evicted), then the engine loads
(``replica_startup_s``); the pre-warm horizon covers the warm start only (a cold node's first replica
is ``replica_stage_s`` late); one deployment; one training trace (openb pods, whole-node jobs by
default), re-scaled to two loads in the benchmark (``training_load`` 0.7 and 0.8; with 1-8-GPU jobs,
``gpu_scale`` 1, the trace spans too few days to reach either); training run times known exactly to the
backfill scheduler.
"""
