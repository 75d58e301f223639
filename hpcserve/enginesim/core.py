"""The engine simulator's latency model and scheduler: continuous batching without a GPU.

This is hpcserve's simulator, not vLLM. It reproduces the shape of vLLM's timing, not its numbers:

- Requests wait in a FIFO queue; each engine step admits from its head while the batch holds fewer than
  ``max_batch`` sequences and the KV budget (prompt + max_tokens of every running sequence, at most
  ``kv_tokens``) has room. A lone request is always admitted. There is no preemption.
- One step lasts ``prefill_s + decode_s`` (``step_seconds``):
  - ``prefill_s = (prompt tokens of the requests admitted this step) / prefill_tokens_per_s``;
  - ``decode_s = decode_s_per_token * (1 + decode_growth * (b - 1) / max_batch)``, b the batch size, so a
    full batch decodes each token ``1 + decode_growth`` times slower (~(b-1)/max_batch) than a lone sequence.
- Every running sequence gains one token per step; a request admitted in a step gets its first token at the
  end of that step (TTFT = queueing + prefill + one decode step).
- KV usage is (prompt + generated tokens of the running sequences) / ``kv_tokens``.

One asyncio task runs the steps; each request owns a ``Seq`` whose ``event`` is set when it gains tokens
(streams) or finishes. The clock is injected; steps are timed against deadlines so that event-loop lag does
not slow the model down, with catch-up capped at ``MAX_LAG_S``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from hpcserve.enginesim.metrics import Load, SimMetrics
from hpcserve.model.engine_defaults import ENGINE_SIM

MAX_LAG_S = 0.1


@dataclass(frozen=True, slots=True)
class SimConfig:
    """The simulated engine. ``max_batch`` is vLLM's ``--max-num-seqs``; ``max_waiting`` bounds the queue
    (requests past it get 503, so memory stays bounded); ``drain_timeout_s`` is how long SIGTERM waits for
    in-flight requests (keep it under Slurm's KillWait, 30 s by default); with ``api_key``, every /v1 request
    must carry ``Authorization: Bearer <api_key>`` (/health and /metrics stay open), as in vLLM. Defaults:
    ``hpcserve.model.engine_defaults.ENGINE_SIM``, the one source the CLI's flags and a deployment's
    ``simulator:`` settings also read."""

    model: str
    served_model_name: str | None = None
    host: str = ENGINE_SIM.host
    port: int = ENGINE_SIM.port
    max_batch: int = ENGINE_SIM.max_num_seqs
    prefill_tokens_per_s: float = ENGINE_SIM.prefill_tokens_per_s
    decode_s_per_token: float = ENGINE_SIM.decode_ms_per_token / 1000
    decode_growth: float = ENGINE_SIM.decode_growth
    startup_delay_s: float = ENGINE_SIM.startup_delay_s
    max_model_len: int = ENGINE_SIM.max_model_len
    kv_tokens: int = ENGINE_SIM.kv_tokens
    seed: int = ENGINE_SIM.seed
    default_max_tokens: int = ENGINE_SIM.default_max_tokens
    max_waiting: int = ENGINE_SIM.max_waiting
    drain_timeout_s: float = ENGINE_SIM.drain_timeout_s
    api_key: str | None = field(default=None, repr=False)  # vLLM's --api-key: required on /v1; None: open
    enable_sleep_mode: bool = False  # vLLM's --enable-sleep-mode (see hpcserve.enginesim.sleep)
    dev_mode: bool = False  # VLLM_SERVER_DEV_MODE=1: vLLM mounts /sleep, /wake_up, /is_sleeping only then
    weights_gib: float | None = None  # weight size for the sleep timings; None: from the model's name
    sleep_time_scale: float = ENGINE_SIM.sleep_time_scale  # multiplies every sleep/wake time (tests: ~0.1)

    @property
    def name(self) -> str:
        """The model name clients send and metrics carry (vLLM's --served-model-name, else the model)."""
        return self.served_model_name or self.model


def step_seconds(config: SimConfig, batch: int, prefill_tokens: int) -> float:
    """How long one engine step takes with ``batch`` running sequences, ``prefill_tokens`` of them new."""
    prefill = prefill_tokens / config.prefill_tokens_per_s
    decode = config.decode_s_per_token * (1 + config.decode_growth * max(batch - 1, 0) / config.max_batch)
    return prefill + decode


class Seq:
    """One request in the engine. ``limit`` is how many tokens it will get (max_tokens, or fewer to a stop);
    ``generated`` counts those produced so far."""

    __slots__ = ("abandoned", "arrival", "event", "finish_reason", "finished", "generated", "limit",
                 "prompt_tokens", "stream")  # fmt: skip

    def __init__(
        self, prompt_tokens: int, limit: int, finish_reason: str, *, stream: bool, arrival: float
    ) -> None:
        self.prompt_tokens, self.limit, self.finish_reason = prompt_tokens, limit, finish_reason
        self.stream, self.arrival = stream, arrival
        self.generated = 0
        self.finished = self.abandoned = False
        self.event = asyncio.Event()

    @property
    def kv_budget(self) -> int:
        return self.prompt_tokens + self.limit


class EngineFullError(Exception):
    """The waiting queue is at ``max_waiting``."""


class Scheduler:
    """Waiting queue → running batch → one token per step. ``run`` is the one task that times the steps."""

    def __init__(
        self, config: SimConfig, metrics: SimMetrics, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._config, self._metrics, self._clock = config, metrics, clock
        self._waiting: deque[Seq] = deque()
        self._running: list[Seq] = []
        self._reserved = 0
        self._wake = asyncio.Event()
        self._deadline = 0.0
        self._paused = False

    @property
    def busy(self) -> bool:
        """Whether any request is running (a paused engine still finishes these; waiting ones are held)."""
        return bool(self._running)

    def pause(self) -> None:
        """Admit nothing more: new and waiting requests are held until ``resume``."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wake.set()

    def abort_all(self) -> int:
        """Finish every running and waiting request with finish_reason "abort"; how many there were."""
        seqs = [*self._running, *self._waiting]
        for seq in seqs:
            seq.abandoned = seq.finished = True
            seq.finish_reason = "abort"
            seq.event.set()
            self._metrics.success["abort"].inc()
        self._running, self._reserved = [], 0
        self._waiting.clear()
        return len(seqs)

    def load(self) -> Load:
        used = sum(s.prompt_tokens + s.generated for s in self._running)
        return Load(len(self._running), len(self._waiting), min(used / self._config.kv_tokens, 1.0))

    def submit(self, seq: Seq) -> None:
        if len(self._waiting) >= self._config.max_waiting:
            raise EngineFullError
        self._waiting.append(seq)
        self._wake.set()

    def abandon(self, seq: Seq) -> None:
        """Drop a request whose client went away; a no-op once it has finished."""
        if seq.finished or seq.abandoned:
            return
        seq.abandoned = True
        self._metrics.success["abort"].inc()
        if seq in self._running:
            self._running.remove(seq)
            self._reserved -= seq.kv_budget
        else:
            self._waiting.remove(seq)

    async def run(self) -> None:
        while True:
            if not self._running and (self._paused or not self._waiting):
                self._wake.clear()
                await self._wake.wait()
                self._deadline = self._clock()
                continue
            admitted = [] if self._paused else self._admit()
            prefill = sum(s.prompt_tokens for s in admitted)
            await self._sleep(step_seconds(self._config, len(self._running), prefill))
            self._advance(admitted)

    def _admit(self) -> list[Seq]:
        admitted: list[Seq] = []
        while self._waiting and len(self._running) < self._config.max_batch:
            head = self._waiting[0]
            if self._running and self._reserved + head.kv_budget > self._config.kv_tokens:
                break
            self._waiting.popleft()
            self._running.append(head)
            self._reserved += head.kv_budget
            admitted.append(head)
        return admitted

    async def _sleep(self, duration: float) -> None:
        self._deadline = max(self._deadline, self._clock() - MAX_LAG_S) + duration
        await asyncio.sleep(max(self._deadline - self._clock(), 0.0))

    def _advance(self, admitted: list[Seq]) -> None:
        now = self._clock()
        self._metrics.prompt_tokens.inc(sum(s.prompt_tokens for s in admitted if not s.abandoned))
        emitted = 0
        still: list[Seq] = []
        for seq in self._running:
            if seq.generated < seq.limit:
                seq.generated += 1
                emitted += 1
                if seq.generated == 1:
                    self._metrics.ttft.observe(now - seq.arrival)
            if seq.generated >= seq.limit:
                self._finish(seq, now)
            else:
                still.append(seq)
                if seq.stream:
                    seq.event.set()
        self._running = still
        self._metrics.generation_tokens.inc(emitted)

    def _finish(self, seq: Seq, now: float) -> None:
        seq.finished = True
        seq.event.set()
        self._reserved -= seq.kv_budget
        self._metrics.e2e.observe(now - seq.arrival)
        self._metrics.success[seq.finish_reason].inc()
