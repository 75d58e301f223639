"""The engine SIMULATOR's sleep-mode timing model: how long vLLM's ``/sleep`` and ``/wake_up`` take, from
the size of the model's weights. Pure (no I/O); ``SLEEP_TIMINGS`` is the one source of its defaults.

This models vLLM's sleep mode; it is not vLLM. The model is affine in the weight bytes ``w`` (GiB):

- level-1 sleep (weights copied to pinned host RAM, KV cache dropped):
  ``sleep_fixed_s + w / offload_gib_per_s``;
- level-2 sleep (weights and KV cache discarded, nothing copied): ``discard_s``;
- wake from level 1: the ``weights`` tag costs ``w / restore_gib_per_s`` (host RAM to GPU), the
  ``kv_cache`` tag costs ``wake_fixed_s`` (re-mapping the KV cache, CUDA graphs, allocator);
- wake from level 2: the weights are gone, so the ``weights`` tag costs a reload from node-local storage,
  ``w / reload_gib_per_s`` (vLLM wakes with empty weights and needs a ``reload_weights`` call; the simulator
  folds that reload into the wake so that it can serve afterwards), plus ``wake_fixed_s`` for ``kv_cache``.

Figures the defaults are fitted to: the "reported" ones that hpcserve issue 14 quotes (a level-1 wake of
about 3 s for 64 GiB of weights and 2.2 s for an 8B model, bf16 = 14.9 GiB, and a level-1 sleep of about
10 s); their primary source was not re-checked here. They sit inside the ranges of vLLM's own benchmark
post, https://blog.vllm.ai/2025/10/26/sleep-mode.html (0.6B to 235B models, A4000 to A100: level-1 wakes
of 0.1-6 s). Two wake points fix the wake line: 1 / restore rate = (3.0 - 2.2) / (64 - 14.9) s/GiB
(~61 GiB/s) and ``wake_fixed_s`` = 3.0 - 64 / 61.4 (~1.96 s). One sleep point and a small fixed part fix
the sleep line (0.4 s + 64 GiB / 6.67 GiB/s = 10 s). The level-2 reload rate (2 GiB/s, a node-local NVMe
read with a cold page cache) is an assumption, not a published figure; the blog's level-2 wakes (0.8-2.6 s)
are faster, with the weights still in the page cache.

``scale`` multiplies every duration (the simulator's ``--sleep-time-scale``, e.g. 0.1 in tests).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GIB = 1 << 30
BYTES_PER_PARAM = 2  # bf16 / fp16 weights
TAGS = ("weights", "kv_cache")  # vLLM's wake_up tags
_PARAMS = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)[bB](?![a-zA-Z])")


@dataclass(frozen=True, slots=True)
class SleepTimings:
    """Rates and fixed costs of the sleep-mode model (see the module docstring for their sources)."""

    offload_gib_per_s: float = 6.67
    sleep_fixed_s: float = 0.4
    discard_s: float = 0.3
    restore_gib_per_s: float = 61.4
    wake_fixed_s: float = 1.96
    reload_gib_per_s: float = 2.0
    default_weights_gib: float = 8e9 * BYTES_PER_PARAM / GIB  # an 8B model when the name says nothing


SLEEP_TIMINGS = SleepTimings()


def weights_gib(model: str, override: float | None = None, timings: SleepTimings = SLEEP_TIMINGS) -> float:
    """The weight size in GiB: ``override`` when given, else the parameter count in the model's name
    ("Llama-3.1-70B" -> 70e9 params x 2 bytes), else an 8B model's."""
    if override is not None:
        return override
    found = _PARAMS.findall(model.rsplit("/", 1)[-1])
    if found:
        return float(found[-1]) * 1e9 * BYTES_PER_PARAM / GIB
    return timings.default_weights_gib


def sleep_seconds(level: int, gib: float, scale: float = 1.0, timings: SleepTimings = SLEEP_TIMINGS) -> float:
    """How long ``/sleep?level=level`` takes for ``gib`` GiB of weights."""
    if level == 1:
        return scale * (timings.sleep_fixed_s + gib / timings.offload_gib_per_s)
    if level == 2:
        return scale * timings.discard_s
    raise ValueError(f"sleep level must be 1 or 2, got {level}")


def wake_seconds(
    level: int,
    gib: float,
    tags: frozenset[str] = frozenset(TAGS),
    scale: float = 1.0,
    timings: SleepTimings = SLEEP_TIMINGS,
) -> float:
    """How long ``/wake_up`` takes to wake ``tags`` of an engine asleep at ``level``."""
    if level not in (1, 2):
        raise ValueError(f"sleep level must be 1 or 2, got {level}")
    rate = timings.restore_gib_per_s if level == 1 else timings.reload_gib_per_s
    weights = gib / rate if "weights" in tags else 0.0
    kv = timings.wake_fixed_s if "kv_cache" in tags else 0.0
    return scale * (weights + kv)
