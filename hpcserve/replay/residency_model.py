"""The residency replay's inputs (pure once the rows are read): its settings, the modelled start and
wake times, and a request trace split over several models.

Times modelled (seconds; ``w`` = one model's weights in GiB, 14.9 for an 8B model in bf16):
- a cold start (no job; the weights staged on the node's disk, the cold tier of issue 14) =
  ``queue_wait_s`` (Slurm's queue: the job waits for a scheduling pass and its GPUs) + the engine's load
  (``w / load_gib_per_s`` from node-local NVMe, the rate ``hpcserve.enginesim.timing`` assumes for a
  level-2 reload, 2 GiB/s) + ``engine_init_s`` (the engine's start: memory profiling, CUDA graphs).
  Defaults 10 s + 7.5 s + 15 s = 32 s for 8B, 10 + 65 + 15 = 90 s for 70B: the 30-90 s that issue 14
  quotes for the cold tier. The queue wait assumes free GPUs in the inference partition (no
  preemption grace).
- a pool job's start: the agent starts its engines one at a time (each profiles memory alone) and puts
  one to sleep (level 1) whenever ``max_awake`` are awake, so ``queue_wait_s`` + n x (load + init) +
  (n - K) x the level-1 sleep; the job announces once all are healthy.
- a wake from level 1 and a level-1 sleep: ``hpcserve.enginesim.timing`` (the one source of the sleep
  timings, fitted to the figures issue 14 quotes: 2.2 s wake and 2.6 s sleep for 8B).
- a pool job holds at most K = floor(GPU memory x ``gpu_share`` / (w + ``kv_gib``)) engines awake (80 GiB,
  0.9, 14.9 + 3 GiB of KV cache: 4).
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path

from hpcserve.enginesim.timing import sleep_seconds, wake_seconds
from hpcserve.errors import ValidationError
from hpcserve.model.engine_defaults import ENGINE_SIM

DAY_S = 86400.0
GIB_8B = 8e9 * 2 / (1 << 30)


@dataclass(frozen=True, slots=True)
class ResidencySettings:
    """The replay's models, GPUs, windows and modelled times (see the module docstring)."""

    models: int = 12
    weights_gib: float = GIB_8B  # every model's weights
    gpu_gib: float = 80.0  # memory of one GPU (H100/A100 80 GB)
    gpu_share: float = 0.9  # vLLM's --gpu-memory-utilization for the whole job
    kv_gib: float = 3.0  # KV cache one awake engine keeps beside its weights
    gpus_per_replica: int = 1
    queue_wait_s: float = 10.0
    load_gib_per_s: float = 2.0
    engine_init_s: float = 15.0
    warm_after_s: float = 120.0  # the tiers: idle this long -> asleep (job kept)
    idle_to_zero_s: float = 600.0  # every policy: idle this long -> no job
    tick_s: float = 10.0  # the autoscaler's tick
    max_replicas: int = 4  # per deployment or pool
    scale_up_window_s: float = 10.0
    scale_down_window_s: float = 300.0
    max_num_seqs: int = ENGINE_SIM.max_num_seqs
    prefill_tokens_per_s: float = ENGINE_SIM.prefill_tokens_per_s
    decode_ms_per_token: float = ENGINE_SIM.decode_ms_per_token

    @property
    def cold_start_s(self) -> float:
        """Submit to ready for one model's job (the module docstring's cold start)."""
        return self.queue_wait_s + self.load_s

    @property
    def load_s(self) -> float:
        """One engine's start once the job runs: its weights from node-local disk, then its init."""
        return self.weights_gib / self.load_gib_per_s + self.engine_init_s

    @property
    def wake_s(self) -> float:
        return wake_seconds(1, self.weights_gib)

    @property
    def sleep_s(self) -> float:
        return sleep_seconds(1, self.weights_gib)

    @property
    def max_awake(self) -> int:
        """Engines one pool job keeps awake: what fits in its GPUs' memory (at least 1)."""
        room = self.gpu_gib * self.gpu_share * self.gpus_per_replica
        return max(1, math.floor(room / (self.weights_gib + self.kv_gib)))

    def job_start_s(self, engines: int, awake: int) -> float:
        """Submit to ready for a job that starts ``engines`` one at a time, keeping ``awake`` awake."""
        return self.queue_wait_s + engines * self.load_s + max(engines - awake, 0) * self.sleep_s


@dataclass(frozen=True, slots=True)
class Request:
    """One request of the replay: arrival (s), the model it asks for (0 = the most popular), tokens."""

    at: float
    model: int
    prompt: int
    output: int


@dataclass(frozen=True, slots=True)
class Trace:
    """A request trace's rows: arrivals (s from its first request, sorted) and token counts."""

    arrivals: tuple[float, ...]
    prompts: tuple[int, ...]
    outputs: tuple[int, ...]
    source: str

    @property
    def span_s(self) -> float:
        """The trace's period when looped: its last arrival plus one mean gap."""
        last = self.arrivals[-1]
        return last + last / max(len(self.arrivals) - 1, 1)


def read_trace(path: Path) -> Trace:
    """A per-request CSV (arrival_time_s, prompt_tokens, output_tokens), e.g. azure_llm_2023_conv.csv."""
    try:
        with path.open(newline="") as handle:
            rows = [(float(r["arrival_time_s"]), int(r["prompt_tokens"]), int(r["output_tokens"]))
                    for r in csv.DictReader(handle)]  # fmt: skip
    except OSError as exc:
        raise ValidationError(f"cannot read trace {path}: {exc.strerror} (fix: check --trace)") from exc
    except (KeyError, ValueError) as exc:
        raise ValidationError(
            f"{path}: not a request trace ({exc}) (fix: pass a CSV with arrival_time_s, prompt_tokens, "
            "output_tokens, e.g. azure_llm_2023_conv.csv)"
        ) from exc
    if len(rows) < 2:
        raise ValidationError(f"{path}: fewer than 2 requests (fix: pass a longer trace)")
    rows.sort()
    return Trace(tuple(r[0] for r in rows), tuple(r[1] for r in rows), tuple(r[2] for r in rows), path.name)


def zipf_weights(models: int, exponent: float) -> list[float]:
    """Popularity shares of ``models`` models, the k-th (from 1) in proportion to 1 / k^exponent."""
    raw = [1.0 / (k**exponent) for k in range(1, models + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def split_trace(
    trace: Trace, *, models: int, exponent: float, seed: int, hours: float, keep: float = 1.0
) -> list[Request]:
    """The trace looped to ``hours`` (each loop drawn afresh), each request kept with probability ``keep``
    and given a model by Zipf popularity (seeded: the same arguments give the same requests)."""
    rng = random.Random(seed)  # noqa: S311 - a seeded split of a trace, not cryptography
    weights = zipf_weights(models, exponent)
    horizon, span = hours * 3600.0, trace.span_s
    out: list[Request] = []
    loops = math.ceil(horizon / span)
    for loop in range(loops):
        offset = loop * span
        picks = rng.choices(range(models), weights, k=len(trace.arrivals))
        draws = [rng.random() for _ in trace.arrivals]
        for t, prompt, output, model, draw in zip(
            trace.arrivals, trace.prompts, trace.outputs, picks, draws, strict=True
        ):
            if offset + t < horizon and draw < keep:
                out.append(Request(offset + t, model, prompt, output))
    return out
