"""The gateway's log: one line per malformed request or oversized answer, never a traceback, and never
more than a few lines a second however many bad requests arrive.

``OneLine`` throttles lines to ``per_s`` a second (the rest are counted and the count is told in the next
line). ``ParseErrorFilter`` turns aiohttp's "Error handling request" record for an HTTP request that does
not parse (a traceback, logged by aiohttp's own protocol code) into one warning line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aiohttp.http_exceptions import HttpProcessingError


class OneLine:
    def __init__(
        self, log: logging.Logger, per_s: int = 10, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.log, self.per_s, self.clock = log, per_s, clock
        self._second = 0.0
        self._lines = 0
        self.dropped = 0

    def warning(self, message: str, *args: object) -> None:
        now = self.clock()
        if now - self._second >= 1.0:
            self._second, self._lines = now, 0
        if self._lines >= self.per_s:
            self.dropped += 1
            return
        self._lines += 1
        if self.dropped:
            message, args = message + " (%d similar lines dropped)", (*args, self.dropped)
            self.dropped = 0
        self.log.warning(message, *args)


class ParseErrorFilter(logging.Filter):
    """On ``aiohttp.server``: a request that does not parse as HTTP becomes one line, without traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            first = str(exc.message).strip().splitlines()[0] if exc.message else type(exc).__name__
            record.msg, record.args = "malformed HTTP request (%d): %s", (exc.code, first)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def quiet_parse_errors() -> None:
    """Install ``ParseErrorFilter`` on aiohttp's server logger (once)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ParseErrorFilter) for f in logger.filters):
        logger.addFilter(ParseErrorFilter())
