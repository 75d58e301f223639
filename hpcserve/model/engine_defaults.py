"""The engine simulator's defaults, in one place (the simulator is hpcserve's stand-in for vLLM).

Three readers take their defaults from ``ENGINE_SIM``: ``SimConfig`` (hpcserve.enginesim.core), the flags
of ``hpcserve engine-sim`` (hpcserve.cli.engine_cmd) and a deployment's ``simulator:`` settings
(hpcserve.serving.spec.SimulatorSettings). It lives in model/ (pure, imports nothing) because the serving
path may not import the simulator package (import-linter contract "simulator-apart"). The sleep-mode
timings have their own single source: hpcserve.enginesim.timing.SLEEP_TIMINGS.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineSimDefaults:
    """Defaults of the simulator's settings; names as the flags spell them (ms for the decode step)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_num_seqs: int = 32  # vLLM's --max-num-seqs: sequences in the running batch
    prefill_tokens_per_s: float = 8000.0
    decode_ms_per_token: float = 10.0  # one decode step of a lone sequence
    decode_growth: float = 0.5  # a full batch's decode step is (1 + this) times a lone sequence's
    startup_delay_s: float = 0.0  # /health answers 503 this long after binding (a model load)
    max_model_len: int = 4096
    kv_tokens: int = 65536
    seed: int = 0
    default_max_tokens: int = 16
    max_waiting: int = 10000
    drain_timeout_s: float = 20.0
    sleep_time_scale: float = 1.0


ENGINE_SIM = EngineSimDefaults()
