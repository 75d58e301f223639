"""Admission of one request, decided purely from its body, the routes, the key and the config.

Answers, in the order they are checked (after the key, which the app checks first):
- 400 ``invalid_json`` / ``missing_model`` / ``invalid_max_tokens``: the body is not a JSON object, has no
  string ``model``, or a max_tokens that is not a positive integer;
- 404 ``model_not_found``: no deployment by that name (as OpenAI answers an unknown model);
- 413 ``prompt_too_long``: the estimated prompt tokens (characters / ``chars_per_token``, plus token-id
  prompts counted as given) exceed the deployment's ``max_prompt_tokens`` (or the gateway's default).
An admitted request has its max_tokens (``max_completion_tokens`` when a chat request uses that) clamped to
the smallest of the key's, the deployment's and the gateway's caps, or set to it when absent; a stream that
does not ask for usage asks the replica for it anyway (``stream_options.include_usage``), and the gateway
strips the usage event from what the client sees.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from hpcserve.serving.gateway.config import GatewayConfig
from hpcserve.serving.gateway.keys import ApiKey
from hpcserve.serving.gateway.routes import DeploymentRoute

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
MESSAGE_OVERHEAD_TOKENS = 4  # role and separators of one chat message


@dataclass(frozen=True, slots=True)
class Rejection:
    """An OpenAI-style error answer."""

    status: int
    message: str
    code: str
    type: str = "invalid_request_error"
    retry_after: int | None = None  # seconds, sent as Retry-After
    deployment: str | None = None  # the deployment asked for, when known (the metrics' model label)


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request to send upstream: ``body`` is what the replica gets (re-encoded only when changed)."""

    route: DeploymentRoute
    body: bytes
    stream: bool
    client_usage: bool  # the client asked for the usage event (so it is not stripped)
    prompt_tokens: int  # the estimate
    max_tokens: int | None  # in effect upstream (None: no cap anywhere)
    clamped: bool  # the gateway lowered or set max_tokens
    prefix: str  # the prompt's start, for prefix affinity ("" when off)

    @property
    def cost(self) -> int:
        """What the key's bucket is charged on admission."""
        return self.prompt_tokens + (self.max_tokens or 0)


def decode_body(raw: bytes) -> dict[str, Any] | Rejection:
    try:
        body = _decode(raw)
    except msgspec.DecodeError as err:
        return Rejection(400, f"request body is not valid JSON: {err}", "invalid_json")
    if not isinstance(body, dict):
        return Rejection(400, "request body must be a JSON object", "invalid_json")
    return body


def find_route(body: Mapping[str, Any], routes: Mapping[str, DeploymentRoute]) -> DeploymentRoute | Rejection:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return Rejection(
            400, "the request names no model: set 'model' (GET /v1/models lists them)", "missing_model"
        )
    route = routes.get(model)
    if route is None:
        return Rejection(
            404, f"the model {model!r} does not exist (GET /v1/models lists them)", "model_not_found"
        )
    return route


def prompt_text(body: Mapping[str, Any]) -> tuple[str, int]:
    """The prompt's text (chat messages' text contents joined) and the count of token-id prompt entries."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return "".join(_message_text(m) for m in messages), MESSAGE_OVERHEAD_TOKENS * len(messages)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt, 0
    if isinstance(prompt, list):
        texts = [p for p in prompt if isinstance(p, str)]
        ids = sum(len(p) if isinstance(p, list) else 1 for p in prompt if not isinstance(p, str))
        return "".join(texts), ids
    return "", 0


def _message_text(message: object) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _cap(*caps: int | None) -> int | None:
    given = [c for c in caps if c is not None]
    return min(given) if given else None


def _clamp(body: dict[str, Any], cap: int | None) -> tuple[int | None, bool] | Rejection:
    """The max_tokens in effect and whether the body was changed to get it."""
    field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    asked = body.get(field)
    if asked is not None and (not isinstance(asked, int) or isinstance(asked, bool) or asked < 1):
        return Rejection(400, f"'{field}' must be a positive integer", "invalid_max_tokens")
    if cap is None or (asked is not None and asked <= cap):
        return asked, False
    body[field] = cap
    return cap, True


def _ask_usage(body: dict[str, Any]) -> bool:
    """For a stream: whether the client asked for usage; if not, ask the replica for it (changing body)."""
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return True
    body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return False


def admit(
    raw: bytes, routes: Mapping[str, DeploymentRoute], key: ApiKey, config: GatewayConfig
) -> Admitted | Rejection:
    """Decide on one request body (see the module docstring)."""
    body = decode_body(raw)
    if isinstance(body, Rejection):
        return body
    route = find_route(body, routes)
    if isinstance(route, Rejection):
        return route
    text, extra = prompt_text(body)
    tokens = math.ceil(len(text) / config.chars_per_token) + extra
    limit = route.max_prompt_tokens or config.max_prompt_tokens
    if limit is not None and tokens > limit:
        message = f"the prompt is ~{tokens} tokens; {route.name} takes at most {limit}"
        return Rejection(413, message, "prompt_too_long", deployment=route.name)
    clamp = _clamp(body, _cap(key.max_tokens, route.max_tokens, config.max_tokens))
    if isinstance(clamp, Rejection):
        return Rejection(400, clamp.message, clamp.code, deployment=route.name)
    max_tokens, clamped = clamp
    stream = body.get("stream") is True
    client_usage = _ask_usage(body) if stream else False
    out = _encode(body) if clamped or (stream and not client_usage) else raw
    prefix = text[: config.affinity_chars] if config.affinity_chars > 0 else ""
    return Admitted(route, out, stream, client_usage, tokens, max_tokens, clamped, prefix)
