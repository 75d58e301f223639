"""The gateway's settings: plain values, validated by the CLI's option ranges."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Timings in seconds; ``None`` caps mean no cap unless the deployment or the key sets one."""

    refresh_interval_s: float = 0.5  # how often the routes source is polled
    keys_refresh_interval_s: float = 2.0  # how often the keys source is polled (new and revoked keys)
    report_interval_s: float = 1.0  # how often report(samples) is called
    usage_flush_interval_s: float = 10.0  # how often usage_sink(rows) is called
    buffer_max: int = 256  # requests waiting per deployment with no ready replica; more get 503
    buffer_timeout_s: float = 120.0  # how long one waits before 503
    retry_after_s: int = 10  # Retry-After on 503 answers
    max_prompt_tokens: int | None = None  # estimated prompt tokens above this get 413
    max_tokens: int | None = None  # max_tokens is clamped to this (and to the key's cap)
    chars_per_token: float = 4.0  # prompt-size estimate: characters per token
    affinity_chars: int = 0  # prefix affinity on the first N characters of the prompt; 0 = off
    affinity_slack: int = 4  # the preferred replica may have this many more requests than the least busy
    upstream_connections: int = 8192  # connection pool size towards the replicas (kept alive)
    connect_timeout_s: float = 3.0  # connecting to a replica; a failure is retried once elsewhere
    read_timeout_s: float = 600.0  # longest silence from a replica (before headers or between chunks)
    eject_s: float = 2.0  # a replica that refused a connection gets no requests this long, if others can
    max_body_bytes: int = 16 * 1024 * 1024  # request bodies above this get 413
    client_body_timeout_s: float = 30.0  # a request body not whole within this gets 408 (slowloris)
    max_upstream_body_bytes: int = 16 * 1024 * 1024  # a non-streamed answer above this gets 502
    queue_max: int = 4096  # requests waiting for a slot per deployment (max_concurrency); more are shed
    queue_timeout_s: float = 120.0  # how long one waits for a slot before 503
    agent_max_age_s: float = 1.0  # a replica agent's engine states are read again when older than this
    wake_timeout_s: float = 120.0  # longest wait for a replica agent to wake an engine (then 503)
