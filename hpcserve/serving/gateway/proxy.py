"""One request's way through the gateway: key, admission, rate limit, buffer, replica, relay, accounting.

Answers the gateway makes itself (all OpenAI-style ``{"error": {"message", "type", "param", "code"}}``):
401 no or unknown key; 408 the body did not arrive within ``client_body_timeout_s``; 400/404/413 from
admission (404 also for a model the key may not reach: checked before any buffering, so it never wakes a
deployment); 429 over the key's token rate (Retry-After: when the bucket will hold the request); 503 no
replica ready (buffer full, or none within ``buffer_timeout_s``, or every replica tried answered 503 while
draining: an engine that answers 503 is skipped for another; Retry-After: ``retry_after_s``); 503
``overloaded`` (queue.py, overload.py: shed, batch first; Retry-After: the expected wait); 502 no
replica reachable (a refused connection, or an engine that refuses the replica's engine key with 401,
is retried once on another replica), the replica broke mid-answer, or its non-streamed answer passed
``max_upstream_body_bytes``; 504 the replica was silent past ``read_timeout_s``; 499 (counted, not sent)
the client went away, and the replica's connection is closed so it stops. A clamped or set max_tokens is
announced in ``X-Hpcserve-Max-Tokens`` (``; overload`` when the deployment's cap under overload did it);
503 ``no_replica_ready`` also when no replica's agent could wake a sleeping engine (wake.py);
``X-Hpcserve-Replica`` names the replica; ``X-Hpcserve-Fallback: <primary> -> <fallback>`` says that an
overloaded deployment's fallback served the request (its ``model`` field names the fallback's model).
Malformed requests and oversized answers are logged in one line each (throttled).

Upstream, each request carries ``Authorization: Bearer <engine key>`` of the replica it goes to (from the
routes), never the client's key: engines answer only the gateway. An engine that answers 401 is not the
replica's own (a replica announced another engine's port): it is ejected, logged, and its 401 never
reaches the client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec
from aiohttp import web

from hpcserve.model.gateway import DeploymentRoute
from hpcserve.serving.gateway.admission import Admitted, Rejection, admit, retarget
from hpcserve.serving.gateway.buffer import BufferFull
from hpcserve.serving.gateway.client import UpstreamPool
from hpcserve.serving.gateway.keys import ApiKey
from hpcserve.serving.gateway.logs import OneLine
from hpcserve.serving.gateway.overload import Shed, fallback_route
from hpcserve.serving.gateway.queue import Slot
from hpcserve.serving.gateway.response import BodyTooLarge, ReadTimeout, Response, UpstreamError
from hpcserve.serving.gateway.routes import Endpoint
from hpcserve.serving.gateway.state import GatewayState
from hpcserve.serving.gateway.stats import NO_KEY, UNKNOWN
from hpcserve.serving.gateway.upstream import SseRelay, error_body, error_event, read_usage

log = logging.getLogger(__name__)
UNAVAILABLE = 503  # an engine's answer while it drains (SIGTERM): retried on another replica
DRAINING = "its engine answered 503 (draining)"
CLIENT_GONE = 499  # nginx's status for a client that closed the connection before the answer
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
TOO_LARGE = Rejection(413, "the request body is too large", "body_too_large")
UNAUTHORIZED = Rejection(
    401, "no valid API key: send 'Authorization: Bearer <key>' with a key from `hpcserve keys create`",
    "invalid_api_key", "authentication_error",
)  # fmt: skip


def error_response(rejection: Rejection) -> web.Response:
    headers = {"Content-Type": "application/json"}
    if rejection.retry_after is not None:
        headers["Retry-After"] = str(rejection.retry_after)
    body = error_body(rejection.message, rejection.code, rejection.type, rejection.param)
    return web.Response(body=body, status=rejection.status, headers=headers)


@dataclass(slots=True)
class Exchange:
    """What happened to one admitted request, for the counters and the key's bucket."""

    started: float
    status: int = 500  # until an answer is chosen: an exception escaping the handler is aiohttp's 500
    ttft: float | None = None
    usage: tuple[int, int] | None = None  # (prompt, completion) tokens a replica spent
    served_by: str | None = None  # the fallback deployment that answered, if one did


class Asker(msgspec.Struct, frozen=True):
    """Who asks, with what: what a fallback needs to admit the request again for another deployment."""

    key: ApiKey
    raw: bytes
    groups: frozenset[str]


class Proxy:
    def __init__(
        self,
        state: GatewayState,
        pool: Callable[[], UpstreamPool],
        on_miss: Callable[[], Awaitable[bool]] | None = None,  # re-read the routes now; whether it did
    ) -> None:
        self.state, self.config, self.clock = state, state.config, state.clock
        self._pool = pool
        self._on_miss = on_miss
        self.log = OneLine(log)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions and /v1/completions."""
        started = self.clock()
        key = self.state.keyring.find(request.headers.get("Authorization"))
        if key is None:
            return self._reject(UNAUTHORIZED, NO_KEY)
        raw = await self._body(request)
        if isinstance(raw, Rejection):
            return self._reject(raw, key.id, request)
        groups = self.state.keyring.groups(key.owner)
        decision = self._admit(raw, key, groups)
        if _unknown_model(decision) and self._on_miss is not None and await self._on_miss():
            decision = self._admit(raw, key, groups)  # made a moment ago?
        if isinstance(decision, Rejection):
            return self._reject(decision, key.id, request)
        wait = self.state.keyring.take(key, decision.cost, started)
        if wait:
            return self._reject(_rate_limited(key, decision, wait), key.id)
        exchange = Exchange(started)
        try:
            return await self._dispatch(request, decision, exchange, Asker(key, raw, groups))
        except asyncio.CancelledError:  # the client went away (aiohttp's handler_cancellation)
            exchange.status = CLIENT_GONE
            raise
        finally:
            self._account(key, decision, exchange)

    def _admit(self, raw: bytes, key: ApiKey, groups: frozenset[str]) -> Admitted | Rejection:
        decision = admit(raw, self.state.routes, key, self.config, groups, self._overload_cap)
        if isinstance(decision, Admitted) and decision.overload_capped:
            self.state.gate.lane(decision.route.name).capped += 1
        return decision

    def _overload_cap(self, route: DeploymentRoute) -> int | None:
        """The deployment's max_tokens cap while requests wait for one of its slots."""
        cap = route.overload.max_tokens
        return cap if cap is not None and self.state.gate.waiting(route.name) else None

    async def _body(self, request: web.Request) -> bytes | Rejection:
        """The request body: 413 over ``max_body_bytes``, 408 when not whole within
        ``client_body_timeout_s``. A body that arrived whole is taken as it lies (aiohttp's ``read()`` costs
        a few microseconds more)."""
        content = request.content
        if content.is_eof():
            raw = content.read_nowait()
            return raw if len(raw) <= self.config.max_body_bytes else TOO_LARGE
        timeout = self.config.client_body_timeout_s
        try:
            async with asyncio.timeout(timeout):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            return TOO_LARGE
        except TimeoutError:
            return Rejection(408, f"the request body did not arrive within {timeout:g} s", "request_timeout")

    def _reject(self, rejection: Rejection, key_id: str, request: web.Request | None = None) -> web.Response:
        self.state.stats.count(rejection.deployment or UNKNOWN, key_id, rejection.status)
        if rejection.malformed and request is not None:
            self.log.warning("malformed request from %s (key %s): %d %s", request.remote, key_id,
                             rejection.status, rejection.message[:200])  # fmt: skip
        return error_response(rejection)

    def _account(self, key: ApiKey, request: Admitted, exchange: Exchange) -> None:
        name, now, state = exchange.served_by or request.route.name, self.clock(), self.state
        ledger = state.stats.ledger(key.id, key.owner, name)
        ledger.count(exchange.status)
        state.metrics.observe(name, exchange.ttft, now - exchange.started)
        used = 0
        if exchange.usage is not None:
            ledger.use(*exchange.usage)
            used = exchange.usage[0] + exchange.usage[1]
        state.keyring.settle(key, request.cost, used, now)

    async def _dispatch(
        self, request: web.Request, adm: Admitted, ex: Exchange, asker: Asker
    ) -> web.StreamResponse:
        if not self.state.ready(adm.route.name):
            refusal = await self._wait_for_replica(adm.route.name)
            if refusal is not None:
                ex.status = refusal.status
                return error_response(refusal)
        free = self.state.gate.take(adm.route, asker.key.priority)  # the common case, without a coroutine
        granted = (adm, free) if free is not None else await self._slot(adm, asker)
        if isinstance(granted, Rejection):
            ex.status = granted.status
            return error_response(granted)
        served, slot = granted
        headers: dict[str, str] = {}
        if served is not adm:
            ex.served_by = served.route.name
            headers["X-Hpcserve-Fallback"] = f"{adm.route.name} -> {served.route.name}"
        try:
            return await self._forward(request, served, ex, headers)
        finally:
            self.state.gate.release(slot)

    async def _slot(self, adm: Admitted, asker: Asker) -> tuple[Admitted, Slot] | Rejection:
        """A slot of the deployment (queue.py), or of its fallback when the key allows it, or a 503."""
        key, gate = asker.key, self.state.gate
        fallback = None
        if key.allow_fallback and adm.route.overload.fallback:
            fallback = fallback_route(key, adm.route, self.state.routes, asker.groups)
        got = await gate.acquire(adm.route, key.priority, fallback is not None)
        if isinstance(got, Slot):
            return adm, got
        if isinstance(got, Shed):
            return _shed(adm.route, key, got)
        assert fallback is not None
        other = self._admit(retarget(asker.raw, fallback[0]), key, asker.groups)
        if isinstance(other, Rejection):
            return other
        again = await gate.acquire(other.route, key.priority, False)
        if isinstance(again, Slot):
            return other, again
        assert isinstance(again, Shed)
        return _shed(other.route, key, again)

    async def _forward(
        self, request: web.Request, adm: Admitted, ex: Exchange, headers: dict[str, str]
    ) -> web.StreamResponse:
        name = adm.route.name
        sent = await self._send(adm, request.path)
        if isinstance(sent, Rejection):
            ex.status = sent.status
            return error_response(sent)
        endpoint, upstream = sent
        self.state.stats.begin(name)
        try:
            ex.status = upstream.status
            headers["X-Hpcserve-Replica"] = f"{endpoint.deployment}/{endpoint.replica}"
            if adm.clamped:
                why = "; overload" if adm.overload_capped else ""
                headers["X-Hpcserve-Max-Tokens"] = f"{adm.max_tokens}; clamped{why}"
            if adm.stream and upstream.status == 200 and upstream.content_type == "text/event-stream":
                return await self._relay_stream(request, adm, upstream, headers, ex)
            return await self._relay_body(adm, upstream, headers, ex)
        finally:
            upstream.release()
            self.state.release(endpoint)
            self.state.stats.end(name)

    async def _wait_for_replica(self, name: str) -> Rejection | None:
        retry = self.config.retry_after_s
        try:
            outcome = await self.state.buffer.wait(name, self.config.buffer_timeout_s)
        except BufferFull:
            message = (
                f"{name} has no ready replica and {self.config.buffer_max} requests already wait for one"
            )
            return Rejection(503, message, "buffer_full", "service_unavailable", retry, name)
        if outcome == "ready":
            return None
        if outcome == "gone":
            return Rejection(404, f"the model {name!r} was removed", "model_not_found", deployment=name)
        message = (
            f"no replica of {name} became ready within {self.config.buffer_timeout_s:g} s; it is starting"
        )
        return Rejection(503, message, "no_replica_ready", "service_unavailable", retry, name)

    async def _send(self, adm: Admitted, path: str) -> tuple[Endpoint, Response] | Rejection:
        """POST to a replica; a connection that fails before any answer, or an engine that refuses the
        replica's key, is retried once on another."""
        tried: list[str] = []
        problem = "no ready replica"
        for _ in range(2):
            endpoint = self.state.pick(adm, tried)
            if endpoint is not None and endpoint.agent is not None:  # sleep mode: awake first (wake.py)
                woken = await self._awake(adm, tried)
                if isinstance(woken, Rejection):
                    return woken
                endpoint = woken
            if endpoint is None:
                break
            self.state.acquire(endpoint)
            try:
                upstream = await self._pool().post(endpoint.url, path, adm.body, endpoint.key)
            except UpstreamError as err:
                self.state.release(endpoint)
                if not err.retryable:
                    return _upstream_failure(adm, err)
                if err.connect:
                    self.state.eject(endpoint)
                problem = f"replica {endpoint.replica} ({endpoint.url}): {err}"
                tried.append(endpoint.url)
                continue
            if upstream.status == UNAUTHORIZED.status:
                problem = self._refused_key(endpoint, upstream)
            elif upstream.status == UNAVAILABLE:
                problem = self._unavailable(endpoint, upstream)
            else:
                return endpoint, upstream
            tried.append(endpoint.url)
        name = adm.route.name
        if problem.endswith(DRAINING):  # the last replica tried drains: come back soon, as when buffered
            message = f"no replica of {name} takes requests now: {problem}"
            retry = self.config.retry_after_s
            return Rejection(503, message, "no_replica_ready", "service_unavailable", retry, name)
        message = f"no replica of {name} could be reached: {problem}"
        return Rejection(502, message, "upstream_unreachable", "upstream_error", deployment=name)

    async def _awake(self, adm: Admitted, tried: list[str]) -> Endpoint | Rejection | None:
        """A replica of the deployment whose engine is awake, woken through its agent if need be: the
        request waits here meanwhile (wake.py); 503 when no replica could wake it."""
        state = self.state
        route = state.deployments.get(adm.route.name, adm.route)
        return await state.waker.awake(route, tried, lambda skip: state.pick(adm, skip))

    def _unavailable(self, endpoint: Endpoint, upstream: Response) -> str:
        """An engine that answered 503 before any byte was relayed: it is draining (its job was cancelled
        from outside hpcserve, or preempted, and the service has not seen it end yet). The request goes to
        another replica; this one gets none for a while."""
        upstream.close()
        self.state.release(endpoint)
        self.state.eject(endpoint)
        return f"replica {endpoint.replica} ({endpoint.url}): {DRAINING}"

    def _refused_key(self, endpoint: Endpoint, upstream: Response) -> str:
        """An engine that answered 401 to the replica's engine key: not the replica's own engine. It gets no
        requests for a while; what happened is logged (throttled) and said in the 502, if no other answers."""
        upstream.close()
        self.state.release(endpoint)
        self.state.eject(endpoint)
        problem = f"replica {endpoint.replica} ({endpoint.url}): its engine refused the replica's engine key"
        self.log.warning("deployment %s: %s (is it that replica's own engine?)", endpoint.deployment, problem)
        return problem

    async def _relay_body(
        self, adm: Admitted, upstream: Response, headers: dict[str, str], ex: Exchange
    ) -> web.Response:
        try:
            body = await upstream.read(self.config.max_upstream_body_bytes)
        except UpstreamError as err:
            if isinstance(err, BodyTooLarge):
                self.log.warning("%s: %s; answered 502", adm.route.name, err)
            upstream.close()
            refusal = _upstream_failure(adm, err)
            ex.status = refusal.status
            return error_response(refusal)
        ex.usage = read_usage(body) if upstream.status == 200 else None
        ex.ttft = self.clock() - ex.started
        kind = upstream.raw_content_type  # the one header the proxy needs: no other is decoded
        headers["Content-Type"] = kind if kind is not None else "application/json"
        return web.Response(body=body, status=upstream.status, headers=headers)

    async def _relay_stream(
        self,
        request: web.Request,
        adm: Admitted,
        upstream: Response,
        headers: dict[str, str],
        ex: Exchange,
    ) -> web.StreamResponse:
        out = web.StreamResponse(status=200, headers={**headers, **SSE_HEADERS})
        relay = SseRelay(strip_usage=not adm.client_usage)
        try:
            await out.prepare(request)
            broken = await self._pump(upstream, relay, out, ex)
            if broken is not None:
                ex.status = 502
                upstream.close()
                await out.write(
                    error_event(f"the replica of {adm.route.name} broke off the stream: {broken}")
                )
            await out.write_eof()
        except ConnectionResetError:  # the client went away: stop the replica's work too
            ex.status = CLIENT_GONE
            upstream.close()
        ex.usage = relay.usage or (adm.prompt_tokens, relay.completion_tokens())
        return out

    async def _pump(
        self, upstream: Response, relay: SseRelay, out: web.StreamResponse, ex: Exchange
    ) -> str | None:
        """Copy whole events as they arrive; None when the stream ended with [DONE], else what broke it."""
        while True:
            try:
                chunk = await upstream.readany()
            except UpstreamError as err:
                return str(err)
            if not chunk:
                break
            data = relay.feed(chunk)
            if data:
                if ex.ttft is None:
                    ex.ttft = self.clock() - ex.started
                await out.write(data)
        tail = relay.close()
        if tail:
            await out.write(tail)
        return None if relay.done else "it ended without [DONE]"


def _upstream_failure(adm: Admitted, err: UpstreamError) -> Rejection:
    name = adm.route.name
    if isinstance(err, ReadTimeout):
        return Rejection(
            504,
            f"the replica of {name} did not answer in time",
            "upstream_timeout",
            "upstream_error",
            deployment=name,
        )
    message = f"the replica of {name} failed: {err}"
    return Rejection(502, message, "upstream_error", "upstream_error", deployment=name)


def _rate_limited(key: ApiKey, adm: Admitted, wait: int) -> Rejection:
    rate = f"{key.rate:g} tokens/s" if key.rate else "rate"
    message = f"key {key.id} is over its {rate}; this request needs ~{adm.cost} tokens; retry in {wait} s"
    return Rejection(429, message, "rate_limit_exceeded", "rate_limit_error", wait, adm.route.name)


def _shed(route: DeploymentRoute, key: ApiKey, shed: Shed) -> Rejection:
    name, wait = route.name, shed.wait_s
    if shed.reason == "gone":
        return Rejection(404, f"the model {name!r} was removed", "model_not_found", deployment=name)
    expected = f"~{wait:.0f} s" if wait is not None else "unknown"
    why = {
        "overload": f"the expected wait ({expected}) passes its bound of {route.overload.shed_wait_s} s",
        "evicted": f"queued batch requests were shed for interactive ones (expected wait {expected})",
        "queue_full": f"its queue is full (expected wait {expected})",
        "timeout": f"no slot came free within the gateway's queue timeout (expected wait {expected})",
    }[shed.reason]
    message = f"{name} is overloaded ({key.priority} request): {why}; retry in {shed.retry_after} s"
    return Rejection(503, message, "overloaded", "service_unavailable", shed.retry_after, name)


def _unknown_model(decision: object) -> bool:
    return isinstance(decision, Rejection) and decision.code == "model_not_found"
