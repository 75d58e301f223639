"""The OpenAI-compatible request and response shapes the engine simulator speaks, as vLLM serves them.

Pure: a request body becomes a ``Job`` (token counts, how many tokens to produce, why it stops), and a
``Job`` plus a token index becomes a response or a stream chunk.

The tokenizer is a stand-in: a word of n characters counts ceil(n / 4) tokens; a chat message adds
``CHAT_TOKENS_PER_MESSAGE`` for its template. The completion is deterministic: the prompt's words in turn
(from an offset set by the seed), or ``token-N`` when the prompt has no words (token ids). ``stop``
strings end it at the first word that contains one; the model never emits EOS, so ``ignore_eos`` changes
nothing.
"""

from __future__ import annotations

import hmac
import time
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec

from hpcserve.enginesim.core import SimConfig

CHAT_TOKENS_PER_MESSAGE = 4
MAX_WORDS = 64  # the completion cycles through at most this many prompt words


class ApiError(Exception):
    """An error vLLM would answer with this status, as ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.status}}


GUARDED_PREFIX = "/v1"  # vLLM's AuthenticationMiddleware guards the paths under /v1 (and leaves the rest)
UNAUTHORIZED = ApiError(
    401, "Unauthorized: send 'Authorization: Bearer <key>' with this engine's key", "AuthenticationError"
)


def authorized(api_key: str | None, path: str, authorization: str | None) -> bool:
    """Whether a request to ``path`` may pass: always without a key; with one, a path outside /v1, or an
    ``Authorization: Bearer <api_key>`` header (compared in constant time)."""
    if api_key is None or not path.startswith(GUARDED_PREFIX):
        return True
    expected = f"Bearer {api_key}".encode()
    return authorization is not None and hmac.compare_digest(authorization.encode(), expected)


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Common(msgspec.Struct, kw_only=True):
    model: str | None = None
    max_tokens: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False


class CompletionRequest(_Common, kw_only=True):
    prompt: str | list[Any]


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Common, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Job:
    """A parsed request: what the scheduler needs and what the response shapes need."""

    chat: bool
    id: str
    created: int
    model: str
    prompt_tokens: int
    limit: int
    finish_reason: str
    words: tuple[str, ...]
    offset: int
    stream: bool
    include_usage: bool

    def token(self, i: int) -> str:
        return f" {self.words[(self.offset + i) % len(self.words)]}" if self.words else f" token-{i}"

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
        }


def count_tokens(text: str) -> int:
    """The tokenizer stand-in: ceil(len(word) / 4) tokens per whitespace-separated word."""
    return sum((len(word) + 3) // 4 for word in text.split())


_COMPLETION = msgspec.json.Decoder(CompletionRequest)
_CHAT = msgspec.json.Decoder(ChatRequest)


def parse_job(body: bytes, config: SimConfig, *, chat: bool) -> Job:
    """Validate a /v1/completions or /v1/chat/completions body; raise ``ApiError`` as vLLM would."""
    try:
        request: CompletionRequest | ChatRequest = (_CHAT if chat else _COMPLETION).decode(body)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise ApiError(400, f"invalid request body: {exc}") from exc
    if request.model is not None and request.model != config.name:
        raise ApiError(404, f"The model `{request.model}` does not exist.", "NotFoundError")
    if isinstance(request, ChatRequest):
        prompt_tokens, words = _chat_prompt(request.messages)
        max_tokens = request.max_completion_tokens or request.max_tokens
    else:
        prompt_tokens, words = _completion_prompt(request.prompt)
        max_tokens = request.max_tokens
    limit = _max_tokens(config, prompt_tokens, max_tokens)
    job = Job(
        chat=chat,
        id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=config.name,
        prompt_tokens=prompt_tokens,
        limit=limit,
        finish_reason="length",
        words=words[:MAX_WORDS],
        offset=config.seed,
        stream=request.stream,
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
    )
    return _apply_stop(job, _stops(request.stop))


def _completion_prompt(prompt: str | list[Any]) -> tuple[int, tuple[str, ...]]:
    if isinstance(prompt, str):
        return count_tokens(prompt), tuple(prompt.split())
    if prompt and all(isinstance(t, int) for t in prompt):
        return len(prompt), ()
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return count_tokens(prompt[0]), tuple(prompt[0].split())
    raise ApiError(
        400,
        "prompt must be a string, one string in a list, or a list of token ids "
        "(the engine simulator takes one prompt per request)",
    )


def _chat_prompt(messages: list[ChatMessage]) -> tuple[int, tuple[str, ...]]:
    if not messages:
        raise ApiError(400, "messages must not be empty")
    texts = [_content_text(m.content) for m in messages]
    return sum(count_tokens(t) for t in texts) + CHAT_TOKENS_PER_MESSAGE * len(messages), tuple(
        " ".join(texts).split()
    )


def _content_text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return " ".join(str(part.get("text", "")) for part in content if part.get("type") == "text")


def _max_tokens(config: SimConfig, prompt_tokens: int, requested: int | None) -> int:
    room = config.max_model_len - prompt_tokens
    if requested is not None and requested < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {requested}.")
    if room < 1 or (requested is not None and requested > room):
        asked = requested if requested is not None else 1
        raise ApiError(
            400,
            f"This model's maximum context length is {config.max_model_len} tokens. However, "
            f"you requested {prompt_tokens + asked} tokens ({prompt_tokens} in the messages, "
            f"{asked} in the completion). Please reduce the length of the messages or "
            "completion.",
        )
    return requested if requested is not None else min(config.default_max_tokens, room)


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return tuple(s for s in ([stop] if isinstance(stop, str) else stop) if s)


def _apply_stop(job: Job, stops: tuple[str, ...]) -> Job:
    if not stops:
        return job
    horizon = min(job.limit, len(job.words)) if job.words else job.limit  # the words repeat
    for i in range(horizon):
        if any(s in job.token(i) for s in stops):
            return Job(**{**_fields(job), "limit": i, "finish_reason": "stop"})
    return job


def _fields(job: Job) -> dict[str, Any]:
    return {name: getattr(job, name) for name in Job.__slots__}


def response(job: Job, generated: int) -> dict[str, Any]:
    """The non-streamed body."""
    text = "".join(job.token(i) for i in range(generated))
    if job.chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": job.finish_reason,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": job.finish_reason}
    return {
        "id": job.id,
        "object": "chat.completion" if job.chat else "text_completion",
        "created": job.created,
        "model": job.model,
        "choices": [choice],
        "usage": job.usage(generated),
    }


def chunk(job: Job, text: str | None, finish_reason: str | None = None, *, role: bool = False) -> bytes:
    """One SSE event of a stream: a token (``text``), the final empty one with ``finish_reason``, or, for
    chat, the first one that names the assistant's role."""
    if job.chat:
        delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {
            "index": 0,
            "delta": delta,
            "logprobs": None,
            "finish_reason": finish_reason,
        }
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return _event(_envelope(job, [choice]))


def usage_chunk(job: Job, generated: int) -> bytes:
    """The last event before [DONE] when ``stream_options.include_usage`` is set: no choices, the usage."""
    return _event({**_envelope(job, []), "usage": job.usage(generated)})


DONE = b"data: [DONE]\n\n"


def _envelope(job: Job, choices: list[dict[str, Any]]) -> dict[str, Any]:
    kind = "chat.completion.chunk" if job.chat else "text_completion"
    return {"id": job.id, "object": kind, "created": job.created, "model": job.model, "choices": choices}


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"
