"""Which replica takes a request: a pure choice over a snapshot of outstanding requests.

The rule (the vLLM router's shape: endpoints plus stats in, one endpoint out):
- candidates are the ready, non-draining endpoints, less the ``exclude``d ones (a replica that just failed
  for this request) and, while others remain, the ``avoid``ed ones (replicas that recently refused
  connections);
- with prefix affinity, the endpoint that the prompt's prefix hashes to (rendezvous hashing, so adding or
  removing a replica moves only its share of prefixes) wins unless it has more than ``slack`` requests
  outstanding beyond the least busy one;
- otherwise the least outstanding requests wins; among equals, ``turn`` (a counter the caller advances)
  picks in rotation, so the choice is deterministic for given inputs and still spreads an idle load.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence

from hpcserve.model.gateway import Endpoint


def prefix_digest(text: str, chars: int) -> bytes | None:
    """The affinity key of a prompt: a digest of its first ``chars`` characters (None when off or empty)."""
    if chars <= 0 or not text:
        return None
    return hashlib.blake2b(text[:chars].encode(), digest_size=8).digest()


def _rendezvous(digest: bytes, url: str) -> bytes:
    return hashlib.blake2b(url.encode(), digest_size=8, key=digest).digest()


def pick_endpoint(
    ready: Sequence[Endpoint],
    outstanding: Mapping[str, int],
    *,
    turn: int = 0,
    affinity: bytes | None = None,
    slack: int = 4,
    exclude: Collection[str] = (),
    avoid: Collection[str] = (),
) -> Endpoint | None:
    """The endpoint for the next request, or None when no candidate is left (see the module docstring)."""
    candidates = [e for e in ready if e.url not in exclude] if exclude else ready
    if avoid:
        candidates = [e for e in candidates if e.url not in avoid] or candidates
    if not candidates:
        return None
    least, idle = _least_loaded(candidates, outstanding)
    if affinity is not None:
        preferred = max(candidates, key=lambda e: _rendezvous(affinity, e.url))
        if outstanding.get(preferred.url, 0) <= least + slack:
            return preferred
    return idle[turn % len(idle)]


def _least_loaded(
    candidates: Sequence[Endpoint], outstanding: Mapping[str, int]
) -> tuple[int, list[Endpoint]]:
    """The fewest outstanding requests, and the candidates that have that many (in their order)."""
    least, idle = -1, []
    for endpoint in candidates:
        load = outstanding.get(endpoint.url, 0)
        if load < least or least < 0:
            least, idle = load, [endpoint]
        elif load == least:
            idle.append(endpoint)
    return least, idle
