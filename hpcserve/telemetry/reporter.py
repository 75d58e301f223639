"""The reporter: samples the job's GPUs every ``interval_s`` and sends the samples to the service
(``POST /v1/telemetry``), in a background thread of the job (replicas, callables) or as
``hpcserve telemetry run`` (templates).

It never fails the job. With no NVML here (no GPU) it logs one line and stops. A report that fails (the
service restarting, unreachable) is one warning line; the samples wait in a bounded buffer and the reporter
tries again after a back-off (``hpcserve.telemetry.batching``), with one line again once reports get through.
A refusal (403: not this job's owner; 400) is one warning line, and the reporter stops.

Opt out with ``HPCSERVE_TELEMETRY=0`` in the job's environment; ``HPCSERVE_TELEMETRY_INTERVAL_S`` sets the
interval (default 15 s).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from hpcserve.model.telemetry import GpuSample
from hpcserve.telemetry.batching import (
    REPORT_PATH,
    Outcome,
    ReplicaIdentity,
    keep_newest,
    outcome_of,
    report_bodies,
    report_headers,
    retry_delay_s,
)

if TYPE_CHECKING:
    from hpcserve.service.client import ServiceClient

log = logging.getLogger("hpcserve.telemetry")
ENABLE_ENV = "HPCSERVE_TELEMETRY"  # "0" (or false/no/off): no telemetry from this job
INTERVAL_ENV = "HPCSERVE_TELEMETRY_INTERVAL_S"
DEFAULT_INTERVAL_S = 15.0
CALL_TIMEOUT_S = 10.0  # one report; a service that takes longer is treated as down for this round
STOP_JOIN_S = 5.0  # a job's end waits at most this long for the last report

Answer = tuple[int | None, str]  # the HTTP status (None: no answer) and the service's line
Post = Callable[[dict[str, Any], dict[str, str]], Answer]


class Sampler(Protocol):
    """What the reporter needs of ``NvmlSampler``."""

    def open(self) -> Any: ...
    def sample(self) -> list[GpuSample]: ...
    def close(self) -> None: ...


def enabled(environ: dict[str, str] | None = None) -> bool:
    """False when the job opted out (``HPCSERVE_TELEMETRY=0``)."""
    value = (os.environ if environ is None else environ).get(ENABLE_ENV, "1")
    return value.strip().lower() not in ("0", "false", "no", "off")


def interval_from_env(default: float = DEFAULT_INTERVAL_S) -> float:
    """``HPCSERVE_TELEMETRY_INTERVAL_S`` when it is a positive number, else ``default``."""
    try:
        value = float(os.environ.get(INTERVAL_ENV, ""))
    except ValueError:
        return default
    return value if value > 0 else default


class Reporter:
    """Samples every ``interval_s`` and reports after each sample (or after the back-off, following a
    failure). ``run`` loops until ``stop``; ``start`` runs it in a daemon thread."""

    def __init__(
        self,
        job_id: str,
        sampler: Sampler,
        post: Post,
        interval_s: float = DEFAULT_INTERVAL_S,
        replica: ReplicaIdentity | None = None,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        import time

        self.job_id, self.sampler, self.post, self.interval_s = job_id, sampler, post, interval_s
        self.replica, self.monotonic = replica, monotonic or time.monotonic
        self.buffer: list[GpuSample] = []
        self.failures, self.sent, self.next_report = 0, 0, 0.0
        self.refused = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Reporter:
        self._thread = threading.Thread(target=self.run, name="hpcserve-telemetry", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = STOP_JOIN_S) -> None:
        """End the loop after one last sample and report (waiting at most ``timeout``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        from hpcserve.telemetry.nvml import NvmlUnavailable

        try:
            self.sampler.open()
        except NvmlUnavailable as exc:
            log.info("telemetry: %s; this job reports no GPU samples", exc)
            return
        except Exception as exc:  # whatever else: the job goes on without telemetry
            log.warning(
                "telemetry: cannot start the NVML sampler (%s: %s): no GPU samples", type(exc).__name__, exc
            )
            return
        try:
            while not self.refused:
                self.tick()
                if self._stop.wait(self.interval_s):
                    self.tick(final=True)
                    break
        finally:
            self.sampler.close()

    def tick(self, final: bool = False) -> None:
        """One sample of every GPU, and a report when one is due (always when ``final``)."""
        try:
            self.buffer = keep_newest([*self.buffer, *self.sampler.sample()])
        except Exception as exc:  # a driver in trouble must not end the job
            log.warning("telemetry: sampling failed: %s", exc)
        if self.buffer and not self.refused and (final or self.monotonic() >= self.next_report):
            self.report()

    def report(self) -> None:
        """Send the buffer, oldest first; stop at the first failure and keep what was not sent."""
        for body in report_bodies(self.job_id, self.buffer, self.replica):
            status, line = self._post(body)
            outcome = outcome_of(status)
            if outcome is Outcome.SENT:
                self._sent(len(body["samples"]))
                continue
            if outcome is Outcome.REFUSED:
                self.refused = True
                log.warning("telemetry: the service refused this job's samples (%s): reporting stops", line)
            else:
                self._failed(line)
            return

    def _post(self, body: dict[str, Any]) -> Answer:
        try:
            return self.post(body, report_headers(self.replica))
        except Exception as exc:  # whatever the transport raises: a failed report, not a failed job
            return None, f"{type(exc).__name__}: {exc}"

    def _sent(self, count: int) -> None:
        del self.buffer[:count]
        self.sent += count
        if self.failures:
            log.info("telemetry: reporting again after %d failed tries", self.failures)
        self.failures, self.next_report = 0, 0.0

    def _failed(self, line: str) -> None:
        self.failures += 1
        delay = retry_delay_s(self.interval_s, self.failures)
        self.next_report = self.monotonic() + delay
        if self.failures == 1:
            log.warning("telemetry: cannot report to the service (%s): keeping the samples, retrying with "
                        "back-off up to %.0f s", line, retry_delay_s(self.interval_s, 99))  # fmt: skip


def client_post(make_client: Callable[[], ServiceClient]) -> Post:
    """``Post`` over hpcserve's service client (the Unix socket, or TCP with munge), made at the first
    report (in the reporter's thread, once NVML answered) with a short timeout."""
    made: list[ServiceClient] = []

    def post(body: dict[str, Any], headers: dict[str, str]) -> Answer:
        from hpcserve.service.client import ServiceError, ServiceUnavailable

        if not made:
            made.append(make_client())
            made[0].timeout_s = CALL_TIMEOUT_S
        try:
            made[0].call("POST", REPORT_PATH, body, headers=headers)
        except ServiceUnavailable as exc:
            return None, str(exc)
        except ServiceError as exc:
            return exc.status, str(exc)
        return 200, ""

    return post


def site_client() -> ServiceClient:
    """The service's client as the site config says (``$HPCSERVE_SITE``, else /etc/hpcserve/site.yaml when
    it exists, else the defaults and ``$HPCSERVE_SOCKET``)."""
    from hpcserve.config import load_site_config
    from hpcserve.service.client import ServiceClient

    path = os.environ.get("HPCSERVE_SITE") or "/etc/hpcserve/site.yaml"
    site = load_site_config(Path(path)) if Path(path).is_file() else None
    return ServiceClient.for_site(site)


def start_reporter(
    job_id: str,
    client: Callable[[], ServiceClient] = site_client,
    replica: ReplicaIdentity | None = None,
    interval_s: float | None = None,
) -> Reporter | None:
    """A started reporter for ``job_id`` (None when the job opted out, has no job id or no GPUs); NVML and
    the service's client are set up in its thread, so the job does not wait for them."""
    from hpcserve.telemetry.devices import job_sees_gpus

    if not enabled() or not job_id or not job_sees_gpus(os.environ):
        return None
    from hpcserve.telemetry.nvml import NvmlSampler

    _log_to_stderr()
    every = interval_s if interval_s is not None else interval_from_env()
    return Reporter(job_id, NvmlSampler(job_id), client_post(client), every, replica).start()


def _log_to_stderr() -> None:
    """Inside a job nothing may have set logging up: the reporter's lines then go to the job's stderr."""
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s hpcserve %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
