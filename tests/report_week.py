"""A week of real-shaped data for the ``hpcserve report`` tests (tests/test_report*.py), written through the
store's own API, and the API context over a store with no Slurm behind it."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from hpcserve.api.caller import Caller
from hpcserve.api.context import ApiContext
from hpcserve.api.telemetry import FLAGS_STATE
from hpcserve.config import load_policy, load_site_config
from hpcserve.model.telemetry import GpuSample, IdleFlag
from hpcserve.store import EngineSample, HistoryStore, LostWork, NewStep, QueueSample
from hpcserve.telemetry.idle import flag_to_json
from tests.conftest import POLICY, SITE

NOW = datetime(2026, 12, 7, 18, 0, tzinfo=UTC)
WEEK_S = 7 * 86400.0
ALICE = Caller(1001, "alice", frozenset({"alice"}))
BOB = Caller(1002, "bob", frozenset({"bob"}))
CAROL = Caller(1003, "carol", frozenset({"carol", "hpcadmin"}))  # an admin through @hpcadmin


class NoSlurm:
    """A Slurm client with no methods: the report's store-backed tests never reach Slurm (usage, which
    reads sacct, then says in words that it could not be read)."""

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"the report's unit tests do not call Slurm ({name})")


# ------------------------------------------------------------------------------------ a week of data


def populate(store: HistoryStore, clock: list[datetime], deployments: bool = True) -> None:
    """A week up to ``clock[0]`` (the store's clock; the moves set it back for each): 10-minute samples
    with a daily cycle and a 5-hour outage, two deployments (alice's and bob's) with two replicas and a
    gateway each, GPU telemetry, three node moves, one eviction and two idle flags. ``deployments``
    False: their rows are left to the caller (the cluster test serves them through the API)."""
    now = clock[0]
    rng = random.Random(13)  # noqa: S311 - repeatable noise, not a secret
    queue, engine = [], []
    for i in range(7 * 144):
        at = now - timedelta(days=7) + timedelta(minutes=10 * i)
        if timedelta(days=2) < now - at < timedelta(days=2, hours=5):
            continue
        day = 0.5 + 0.5 * math.sin(2 * math.pi * (at.hour - 8) / 24)
        for name, total, base in (("train", 16, 0.55), ("infer", 16, 0.2), ("all", 32, 0.4)):
            run = min(total, round(total * (base + 0.45 * day * rng.random())))
            pending = round(8 * day * rng.random()) if name != "infer" else 0
            queue.append(QueueSample(at, name, rng.randint(0, 4), pending, run, total - run, total))
        for dep, scale in (("alice-chat", 1.0), ("bob-coder", 0.5)):
            for rep in (0, 1):
                engine.append(EngineSample(
                    at, dep, rep, waiting=round(6 * day * scale * rng.random()), running=4, kv_usage=0.4,
                    ttft_p50=0.08 + 0.25 * day * scale * rng.random(),
                    ttft_p95=0.3 + 1.2 * day * scale * rng.random(), tokens_per_s=300.0))  # fmt: skip
            engine.append(EngineSample(at, dep, None, gateway_waiting=round(3 * day * rng.random()),
                                       source="login1:8080"))  # fmt: skip
    store.add_queue_samples(queue)
    store.add_engine_samples(engine)
    add_gpu_telemetry(store, rng, now)
    if deployments:
        store.create_deployment("alice-chat", "alice", {"model": "m"}, 2, served_model_name="a")
        store.create_deployment("bob-coder", "bob", {"model": "m"}, 2, served_model_name="b")
    for days, node, src, dst in ((5, "node5", "inference", "training"), (3, "node5", "training", "inference"),
                                 (1.2, "node3", "training", "inference")):  # fmt: skip
        clock[0] = now - timedelta(days=days)
        plan = store.create_plan("test", [{"node": node, "dst": dst}], [NewStep(node, src, dst, "move")])
        store.start_step(plan, 0)
        store.mark_step(plan, 0, "done")
    clock[0] = now
    store.add_lost_work(
        [LostWork(now - timedelta(days=2), "4211", "bob", "node5", 4, 5400.0, "alice-chat", "43")]
    )
    flags = [IdleFlag("5001", "alice", "training", "GPUs averaged 4% for 30 min (< 20%)",
                      now - timedelta(hours=3), 4, 12.0, 4.0),
             IdleFlag("5002", "bob", "inference", "served no request for 30 min", now - timedelta(hours=1),
                      1, 1.0, None)]  # fmt: skip
    store.put_state(FLAGS_STATE, {"evaluated_at": now.isoformat(), "flags": [flag_to_json(f) for f in flags]})


def add_gpu_telemetry(store: HistoryStore, rng: random.Random, now: datetime) -> None:
    """NVML readings every 10 minutes: alice's training job 5000 (4 GPUs, busy, days 7 to 3 ago), her
    job 5001 (4 GPUs at ~4%, the last 3 days: flagged idle) and bob's replica job 5002 (1 GPU, ~40%)."""
    jobs = (("5000", "alice", "training", 4, 7.0, 3.0, 85.0), ("5001", "alice", "training", 4, 3.0, 0.0, 4.0),
            ("5002", "bob", "inference", 1, 7.0, 0.0, 40.0))  # fmt: skip
    for job, user, kind, gpus, start_d, end_d, mean in jobs:
        samples = []
        at = now - timedelta(days=start_d)
        while at < now - timedelta(days=end_d):
            samples += [GpuSample(at, job, f"GPU-{job}-{i}", i, max(0.0, min(100.0, rng.gauss(mean, 6))),
                                  30 << 30, 80 << 30, 250.0, 1410) for i in range(gpus)]  # fmt: skip
            at += timedelta(minutes=10)
        store.add_gpu_samples(
            samples, user=user, kind=kind, deployment="bob-coder" if user == "bob" else None
        )


def api_for(store: HistoryStore) -> ApiContext:
    site = load_site_config(SITE).model_copy(update={"admins": ["root", "@hpcadmin"]})
    return ApiContext(site, load_policy(POLICY), store, NoSlurm(), clock=lambda: NOW)


@contextmanager
def week_store(url: str) -> Iterator[HistoryStore]:
    """A migrated store at ``url`` holding the week up to ``NOW``."""
    clock = [NOW]
    with HistoryStore(url, clock=lambda: clock[0]) as store:
        store.upgrade()
        populate(store, clock)
        yield store
