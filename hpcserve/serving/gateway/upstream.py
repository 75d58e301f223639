"""Relaying a replica's answer to the client: JSON whole, SSE as it arrives, failures as clean errors.

``SseRelay`` cuts the upstream byte stream at event boundaries (``\\n\\n``) and forwards every complete
event as soon as it arrives, byte for byte, except the usage event when the client did not ask for it.
It reads the usage from that event; without one, the completion tokens are the content events counted.
A stream that breaks (the replica's job was killed, or it went silent past the read timeout) ends with
one ``data: {"error": ...}`` event, written as soon as the break is seen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgspec

DONE = b"data: [DONE]\n\n"
_encode = msgspec.json.Encoder().encode


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Event(msgspec.Struct):
    usage: _Usage | None = None
    choices: list[Any] = []


_decode_event = msgspec.json.Decoder(_Event).decode


def error_body(message: str, code: str, kind: str, param: str | None = None) -> bytes:
    """An OpenAI-style error: ``{"error": {"message", "type", "param", "code"}}``."""
    return _encode({"error": {"message": message, "type": kind, "param": param, "code": code}})


def error_event(message: str, code: str = "upstream_broken") -> bytes:
    """The last event of a broken stream."""
    return b"data: " + error_body(message, code, "upstream_error") + b"\n\n"


_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')


def read_usage(body: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from a JSON answer's ``usage``, or None when it has none.

    Without decoding the answer: ``"usage"`` followed by ``"`` can only be a key (a quote inside a JSON
    string is escaped), and it is the last key of an OpenAI answer, after the generated text.
    """
    at = body.rfind(b'"usage"')
    if at < 0:
        return None
    prompt, completion = _PROMPT.search(body, at), _COMPLETION.search(body, at)
    if prompt is None or completion is None:
        return None
    return int(prompt.group(1)), int(completion.group(1))


@dataclass(slots=True)
class SseRelay:
    """Cuts a stream into whole events and notes its usage (see the module docstring)."""

    strip_usage: bool
    usage: tuple[int, int] | None = None
    events: int = 0
    done: bool = False
    _rest: bytes = b""

    def feed(self, chunk: bytes) -> bytes:
        """The complete events that ``chunk`` finishes (possibly none)."""
        data = self._rest + chunk if self._rest else chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._rest = data
            return b""
        self._rest, whole = data[end + 2 :], data[: end + 2]
        self.events += whole.count(b"\n\n")
        if b'"usage"' in whole:
            whole = self._take_usage(whole)
        if whole.endswith(DONE):
            self.done = True
        return whole

    def close(self) -> bytes:
        """What is left when the upstream ends (an event without its blank line)."""
        rest, self._rest = self._rest, b""
        return rest

    def _take_usage(self, whole: bytes) -> bytes:
        kept = []
        for event in whole.split(b"\n\n")[:-1]:
            parsed = _parse_event(event)
            if parsed is not None and parsed.usage is not None:
                self.usage = (parsed.usage.prompt_tokens, parsed.usage.completion_tokens)
                if self.strip_usage and not parsed.choices:
                    continue
            kept.append(event + b"\n\n")
        return b"".join(kept)

    def completion_tokens(self) -> int:
        """From the usage event, else the content events (less the closing ``[DONE]``)."""
        if self.usage is not None:
            return self.usage[1]
        return max(0, self.events - (1 if self.done else 0))


def _parse_event(event: bytes) -> _Event | None:
    if not event.startswith(b"data: {"):
        return None
    try:
        return _decode_event(event[6:])
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
