"""Sleep mode in hpcserve's engine SIMULATOR (not vLLM): vLLM's dev-server endpoints, with durations from
the pure model in ``hpcserve.enginesim.timing``.

As in vLLM (``vllm/entrypoints/serve/sleep/api_router.py``: ``attach_router`` returns unless
``VLLM_SERVER_DEV_MODE``), the endpoints are mounted only in dev mode (``VLLM_SERVER_DEV_MODE=1``); without
it they answer 404. In dev mode without ``--enable-sleep-mode``, /sleep and /wake_up answer 500 "Sleep mode
is not enabled in the model config" (vLLM's engine asserts that; the 500 is what FastAPI makes of it) and
/is_sleeping says false. They sit outside /v1, so an API key does not guard them (vLLM's key middleware
guards /v1 only). A bad ``level`` gets a one-line 400 here, where vLLM's ``int(level)`` fails with a 500.

- ``POST /sleep?level=1|2&mode=abort|wait`` (defaults 1 and abort, as vLLM's): the scheduler stops
  admitting; with ``abort``, every running and waiting request ends at once with finish_reason "abort"
  (vLLM's default ``pause_generation`` mode); with ``wait``, the running ones finish first. Then the weights
  move to host RAM (level 1) or are discarded (level 2), which takes ``sleep_seconds``; the answer (200,
  empty) comes when that is done. vLLM's third mode, ``keep``, is refused with 400. Asleep already: 200,
  nothing changes.
- ``POST /wake_up`` (optionally ``?tags=weights`` and/or ``?tags=kv_cache``): wakes those parts, taking
  ``wake_seconds``, and answers 200 when done; the engine serves again once both are awake.
- ``GET /is_sleeping``: ``{"is_sleeping": bool}``; true from the start of a sleep until every tag is awake.

While asleep, /v1/completions and /v1/chat/completions are accepted and held in the waiting queue: they
are served after the wake (vLLM's scheduler is paused and parks them until ``wake_up``; see vLLM PR
#45326's description of that behaviour). /health stays 200 (vLLM's check_health asks whether the engine
is alive, not whether it sleeps: read in v0's AsyncLLMEngine, not checked in V1's), /v1/models answers, and
/metrics shows ``vllm:engine_sleep_state``. The simulator alone (no vLLM metric) also counts the /v1
requests that arrived while it slept, ``hpcserve_enginesim_requests_while_asleep_total``: what a test reads
to check that a gateway never sent to a sleeping engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import Counter

from hpcserve.enginesim.core import Scheduler, SimConfig
from hpcserve.enginesim.metrics import SimMetrics
from hpcserve.enginesim.timing import TAGS, sleep_seconds, wake_seconds, weights_gib

__all__ = ["SleepControl", "add_routes"]

log = logging.getLogger("hpcserve.engine_sim")
MODES = ("abort", "wait")
DRAIN_POLL_S = 0.01


class SleepError(Exception):
    """A bad /sleep or /wake_up parameter: 400 with this one-line message."""


@dataclass
class SleepControl:
    """The engine's sleep state: ``level`` 0 (awake), 1 or 2, and the tags still asleep."""

    config: SimConfig
    scheduler: Scheduler
    metrics: SimMetrics
    level: int = 0
    asleep: set[str] = field(default_factory=set)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def gib(self) -> float:
        return weights_gib(self.config.model, self.config.weights_gib)

    @property
    def is_sleeping(self) -> bool:
        return bool(self.asleep)

    async def sleep(self, level: int, mode: str) -> float:
        """Put the engine to sleep; returns the modelled seconds the offload took (0 if asleep already)."""
        async with self.lock:
            if self.is_sleeping:
                return 0.0
            self.scheduler.pause()
            self.level, self.asleep = level, set(TAGS)
            if mode == "abort":
                aborted = self.scheduler.abort_all()
                log.info("engine simulator sleep: aborted %d requests", aborted)
            while self.scheduler.busy:
                await asyncio.sleep(DRAIN_POLL_S)
            self.metrics.set_sleep_level(level)
            seconds = sleep_seconds(level, self.gib, self.config.sleep_time_scale)
            await asyncio.sleep(seconds)
            log.info("engine simulator asleep at level %d (%.2f GiB, %.2f s)", level, self.gib, seconds)
            return seconds

    async def wake(self, tags: frozenset[str]) -> float:
        """Wake ``tags``; returns the modelled seconds it took. Serves again once no tag is asleep."""
        async with self.lock:
            todo = tags & self.asleep
            if not todo:
                return 0.0
            seconds = wake_seconds(self.level, self.gib, frozenset(todo), self.config.sleep_time_scale)
            await asyncio.sleep(seconds)
            self.asleep -= todo
            if not self.asleep:
                self.level = 0
                self.metrics.set_sleep_level(0)
                self.scheduler.resume()
            log.info("engine simulator woke %s in %.2f s", ",".join(sorted(todo)), seconds)
            return seconds


SLEEP = web.AppKey("hpcserve_engine_sim_sleep", SleepControl)


def add_routes(app: web.Application, control: SleepControl) -> None:
    """Mount /sleep, /wake_up and /is_sleeping on the simulator's app, and count the /v1 requests that
    arrive while it sleeps."""
    app[SLEEP] = control
    arrived = Counter("hpcserve_enginesim_requests_while_asleep", "Requests to /v1 that arrived while the "
                      "engine simulator slept", registry=control.metrics.registry)  # fmt: skip

    @web.middleware
    async def count_asleep(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if control.is_sleeping and request.path.startswith("/v1/") and request.method == "POST":
            arrived.inc()
        return await handler(request)

    app.middlewares.append(count_asleep)
    app.router.add_post("/sleep", _sleep)
    app.router.add_post("/wake_up", _wake_up)
    app.router.add_get("/is_sleeping", _is_sleeping)


def parse_sleep(query: dict[str, str]) -> tuple[int, str]:
    """``level`` and ``mode`` of a /sleep query, or ``SleepError``."""
    raw_level, mode = query.get("level", "1"), query.get("mode", "abort")
    if raw_level not in ("1", "2"):
        raise SleepError(f"level: must be 1 or 2, got {raw_level!r} (fix: POST /sleep?level=1)")
    if mode not in MODES:
        raise SleepError(f"mode: the engine simulator takes abort or wait, got {mode!r} (fix: ?mode=wait)")
    return int(raw_level), mode


def parse_tags(tags: list[str]) -> frozenset[str]:
    """The tags of a /wake_up query (none: all), or ``SleepError``."""
    unknown = sorted(set(tags) - set(TAGS))
    if unknown:
        raise SleepError(f"tags: unknown {', '.join(unknown)} (fix: tags=weights or tags=kv_cache)")
    return frozenset(tags) if tags else frozenset(TAGS)


NOT_ENABLED = "Sleep mode is not enabled in the model config (fix: start the engine with --enable-sleep-mode)"


def _bad(exc: SleepError | str, status: int = 400) -> web.Response:
    kind = "BadRequestError" if status == 400 else "InternalServerError"
    body = {"error": {"message": str(exc), "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


async def _sleep(request: web.Request) -> web.Response:
    if not request.app[SLEEP].config.enable_sleep_mode:
        return _bad(NOT_ENABLED, 500)
    try:
        level, mode = parse_sleep(dict(request.query))
    except SleepError as exc:
        return _bad(exc)
    await request.app[SLEEP].sleep(level, mode)
    return web.Response(status=200)


async def _wake_up(request: web.Request) -> web.Response:
    if not request.app[SLEEP].config.enable_sleep_mode:
        return _bad(NOT_ENABLED, 500)
    try:
        tags = parse_tags(request.query.getall("tags", []))
    except SleepError as exc:
        return _bad(exc)
    await request.app[SLEEP].wake(tags)
    return web.Response(status=200)


async def _is_sleeping(request: web.Request) -> web.Response:
    return web.json_response({"is_sleeping": request.app[SLEEP].is_sleeping})
