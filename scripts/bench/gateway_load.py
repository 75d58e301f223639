"""Load clients for scripts/bench/gateway.py, run as their own process (so the client does not take the
gateway's CPU time slices), each printing one JSON line:

- ``latency RATE SECONDS ROUNDS URL...``: open-loop non-streamed 8-token completions at RATE/s (evenly
  spaced, so the load stays modest whatever the latency), for SECONDS per URL in each of ROUNDS rounds,
  the URLs taking turns; prints p50 and p99 in ms per URL, and errors;
- ``streams N URL``: N concurrent SSE streams (30 events over ~6 s each); prints the streams that ended
  with ``[DONE]`` and no error event, the errors (non-200 answers, exceptions, error events, no
  ``[DONE]``), the peak of streams open at once and the seconds taken;
- ``sse N URL TOKENS SECONDS``: N workers each opening fast-token SSE streams (TOKENS tokens, model
  ``bench``) one after the other for SECONDS; prints the events received (``\n\n``-ended, ``[DONE]``
  included), the streams, the errors (as for ``streams``) and the seconds taken.
"""

from __future__ import annotations

import asyncio
import json
import resource
import statistics
import sys
import time

from aiohttp import ClientSession, ClientTimeout, TCPConnector

KEY = "sk-gateway-bench"
HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
SMALL = b'{"model": "bench", "prompt": "hello there, gateway", "max_tokens": 8}'
STREAM = {"model": "stream", "prompt": "hi", "max_tokens": 30, "stream": True}


async def _timed(http: ClientSession, url: str, out: list[float], errors: list[int]) -> None:
    started = time.perf_counter()
    try:
        async with http.post(url, data=SMALL, headers=HEADERS) as resp:
            await resp.read()
            if resp.status != 200:
                errors.append(resp.status)
                return
    except Exception:
        errors.append(0)
        return
    out.append((time.perf_counter() - started) * 1000)


async def _paced(
    http: ClientSession, url: str, rate: float, seconds: float, out: list[float], errors: list[int]
) -> None:
    tasks = []
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_timed(http, url, out, errors)))
    await asyncio.gather(*tasks)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def latency(rate: float, seconds: float, rounds: int, urls: list[str]) -> dict[str, object]:
    samples: dict[str, list[float]] = {u: [] for u in urls}
    errors: list[int] = []
    async with ClientSession(connector=TCPConnector(limit=256)) as http:
        for url in urls:  # warm-up: connections and caches
            await _paced(http, url + "/v1/completions", rate, 0.5, [], errors)
        for _ in range(rounds):
            for url in urls:
                await _paced(http, url + "/v1/completions", rate, seconds, samples[url], errors)
    return {
        "p50": {u: statistics.median(v) for u, v in samples.items()},
        "p99": {u: _percentile(v, 0.99) for u, v in samples.items()},
        "errors": len(errors),
    }


async def _stream(http: ClientSession, url: str, counts: dict[str, int]) -> None:
    try:
        async with http.post(url, json=STREAM, headers=HEADERS) as resp:
            if resp.status != 200:
                counts["errors"] += 1
                return
            counts["open"] += 1
            counts["peak"] = max(counts["peak"], counts["open"])
            tail = b""
            async for chunk in resp.content.iter_any():
                tail = (tail + chunk)[-256:]
            counts["open"] -= 1
            bad = not tail.endswith(b"data: [DONE]\n\n") or b'{"error"' in tail
            counts["errors" if bad else "ok"] += 1
    except Exception:
        counts["errors"] += 1


async def streams(n: int, url: str) -> dict[str, object]:
    counts = {"ok": 0, "errors": 0, "open": 0, "peak": 0}
    started = time.monotonic()
    async with ClientSession(connector=TCPConnector(limit=0), timeout=ClientTimeout(total=120)) as http:
        await asyncio.gather(*(_stream(http, url + "/v1/completions", counts) for _ in range(n)))
    del counts["open"]
    return {**counts, "seconds": time.monotonic() - started}


async def _sse_worker(
    http: ClientSession, url: str, body: bytes, until: float, counts: dict[str, int]
) -> None:
    while time.monotonic() < until:
        try:
            async with http.post(url, data=body, headers=HEADERS) as resp:
                data = await resp.read()
                if resp.status != 200:
                    counts["errors"] += 1
                    continue
        except Exception:
            counts["errors"] += 1
            continue
        bad = not data.endswith(b"data: [DONE]\n\n") or b'{"error"' in data
        counts["errors" if bad else "streams"] += 1
        counts["events"] += data.count(b"\n\n")


async def sse(n: int, url: str, tokens: int, seconds: float) -> dict[str, object]:
    counts = {"events": 0, "streams": 0, "errors": 0}
    body = json.dumps({"model": "bench", "prompt": "hi", "max_tokens": tokens, "stream": True}).encode()
    started = time.monotonic()
    async with ClientSession(connector=TCPConnector(limit=0), timeout=ClientTimeout(total=120)) as http:
        workers = (
            _sse_worker(http, url + "/v1/completions", body, started + seconds, counts) for _ in range(n)
        )
        await asyncio.gather(*workers)
    return {**counts, "seconds": time.monotonic() - started}


def main(argv: list[str]) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    from hpcserve.serving.gateway.serve import new_event_loop

    loop = new_event_loop()
    if argv[0] == "latency":
        result = loop.run_until_complete(latency(float(argv[1]), float(argv[2]), int(argv[3]), argv[4:]))
    elif argv[0] == "sse":
        result = loop.run_until_complete(sse(int(argv[1]), argv[2], int(argv[3]), float(argv[4])))
    else:
        result = loop.run_until_complete(streams(int(argv[1]), argv[2]))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
