"""Bench hpcserve's gateway against nginx and against no proxy at all, on loopback.

Run from the repo root: scripts/bench/gateway [--engines 2] [--streams 2000] [--rounds 3]
[--sse-streams 256] (the wrapper runs this file with .venv/bin/python). It installs nginx and wrk with
apt-get when they are missing, and runs everything as its own processes in a temp dir: nginx gets its own
config there (``-p``/``-c``/``-e``; the system's /etc/nginx is never read or changed), and every process
it starts is stopped at the end.

Set-up: ``--engines`` engine simulators (``hpcserve engine-sim``, decode 0 ms/token, unbounded prefill, so
the engine answers at once) for model ``bench``, two slow ones for model ``stream`` (200 ms/token); the
gateway (``hpcserve gateway``, one process) routing both; nginx (one worker, keep-alive upstreams, no
buffering) with one port in front of engine 0 and one in front of all engines. Loads:
1. latency: open-loop 8-token completions at ``--rate``/s (modest: a few % of an engine's capacity), from
   an asyncio client process (scripts/bench/gateway_load.py); direct, gateway and nginx all in front of
   engine 0, taking turns within each round; added p50/p99 = proxy's percentile minus the direct one;
2. req/s: ``wrk -t1 -c256`` (C, so the load generator is not the bottleneck), same requests, each target
   in turn within a round, medians over rounds; the gateway and nginx spread over all engines, direct hits
   engine 0 alone. CPU time per request of the gateway and of nginx is reported from /proc;
3. streams: ``--streams`` concurrent SSE streams (30 events over ~6 s each) through the gateway, from the
   client process; errors are non-200 answers, exceptions, error events or a missing ``[DONE]``; the
   peak of streams open at once is reported too;
4. SSE events: ``--sse-streams`` concurrent fast-token streams (``--sse-tokens`` tokens each from the decode-0
   engines, one stream after another per client worker, for ``--sse-seconds``) through the gateway and
   through nginx (over all engines), taking turns within each round; the events forwarded per CPU-second
   of the proxy process (nginx: its worker), medians over rounds, so the proxy's cost per event is
   compared, not the engines' speed.
``--baseline-worktree DIR`` (repeatable) runs another gateway from another checkout of hpcserve (``git
worktree add DIR <commit>``; ``python -m hpcserve gateway`` with DIR as its working directory and
PYTHONPATH) on the same engines, reported as ``base:<DIR's name>`` beside ``gateway`` in the req/s and SSE
loads (taking turns with it in every round), so a change's effect is measured in one run on a noisy
machine. ``--loads`` picks loads
(``latency,rps,sse,streams``; all by default).
Goals: added p50 <= 1 ms and p99 <= 5 ms, gateway >= 0.8x nginx's req/s, >= 0.5x nginx's SSE events per
CPU-second, 0 errors at 2,000 streams.
Always exits 0 once it ran: it reports PASS/MISS, it does not test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-gateway-bench"
BODY = '{"model": "%s", "prompt": "hello there, gateway", "max_tokens": %d}'
WRK_LUA = """wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""
LOADS = ("latency", "rps", "sse", "streams")
GOALS = {"p50_ms": 1.0, "p99_ms": 5.0, "rps_ratio": 0.8, "sse_ratio": 0.5}


@dataclass(frozen=True, slots=True)
class WrkResult:
    rps: float
    requests: int
    errors: int


@dataclass(frozen=True, slots=True)
class Throughput:
    """Median req/s per target, wrk's errors in all, median CPU microseconds per request per proxy."""

    rps: dict[str, float]
    errors: int
    cpu_us: dict[str, float]
    cpu_range: dict[str, tuple[float, float]]  # lowest and highest CPU us/request over the rounds


@dataclass(frozen=True, slots=True)
class SseRate:
    """Median SSE events/s and events per CPU-second of the proxy, per target; errors in all."""

    events_per_s: dict[str, float]
    per_cpu_s: dict[str, float]
    errors: int


@dataclass(frozen=True, slots=True)
class Rig:
    """Base URLs: direct (engine 0), the gateway, nginx in front of engine 0 and in front of all; and the
    gateway's routes file with the engines' ports, to switch the gateway between engine 0 and all."""

    direct: str
    gateway: str
    nginx_one: str
    nginx_all: str
    routes: Path
    bench: list[int]
    stream: list[int]
    gateway_pid: int
    nginx_pid: int
    baselines: tuple[tuple[str, str, int], ...] = ()  # (name, URL, pid) of each --baseline-worktree

    def route_to(self, engines: int) -> None:
        """Point the gateway's ``bench`` at the first ``engines`` engines (it re-reads within 0.5 s)."""
        self.routes.write_text(routes_yaml(self.bench[:engines], self.stream))
        time.sleep(1.5)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", type=int, default=2, help="fast engine simulators for req/s (default 2)")
    p.add_argument("--streams", type=int, default=2000, help="concurrent SSE streams (default 2000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each load, medians reported (default 3)")
    p.add_argument("--seconds", type=float, default=3.0, help="length of one wrk run (default 3)")
    p.add_argument("--rate", type=float, default=300.0, help="latency load, requests/s (default 300)")
    p.add_argument("--sse-streams", type=int, default=256, help="concurrent SSE streams for events/CPU-s")
    p.add_argument("--sse-tokens", type=int, default=500, help="tokens (events) per SSE stream (default 500)")
    p.add_argument("--sse-seconds", type=float, default=5.0, help="length of one SSE run (default 5)")
    p.add_argument(
        "--baseline-worktree",
        type=Path,
        action="append",
        default=[],
        help="another hpcserve checkout whose gateway runs beside this one (repeatable)",
    )
    p.add_argument("--loads", default=",".join(LOADS), help=f"loads to run (default {','.join(LOADS)})")
    args = p.parse_args(argv)
    args.loads = [load.strip() for load in args.loads.split(",") if load.strip()]
    unknown = sorted(set(args.loads) - set(LOADS))
    if unknown:
        p.error(f"--loads: unknown {', '.join(unknown)}; choose from {', '.join(LOADS)}")
    for tree in args.baseline_worktree:
        if not (tree / "hpcserve" / "__init__.py").exists():
            p.error(f"--baseline-worktree: {tree} holds no hpcserve/ (git worktree add DIR REV)")
    return args


# -- tools and processes -------------------------------------------------------------------------------
def ensure_tools() -> None:
    """Install nginx and wrk from Debian's archive when they are missing."""
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if not missing:
        return
    print(f"installing {' '.join(missing)} with apt-get ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], env=env, check=True, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env, check=True, capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def process(
    argv: list[str], log: Path, cwd: Path = REPO, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A background process for the bench's duration, stopped (by its handle) at the end."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 (loopback http only)
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} did not answer within {timeout:.0f} s") from None
            time.sleep(0.1)


def engine_argv(port: int, model: str, decode_ms: float) -> list[str]:
    return [
        sys.executable, "-m", "hpcserve", "engine-sim", "--port", str(port), "--model", model,
        "--decode-ms-per-token", str(decode_ms), "--decode-growth", "0", "--max-num-seqs", "4096",
        "--prefill-tokens-per-s", "1e12", "--kv-tokens", "100000000",
    ]  # fmt: skip


def routes_yaml(bench: list[int], stream: list[int]) -> str:
    def replicas(ports: list[int]) -> str:
        return "".join(
            f'      - {{replica: {i}, url: "http://127.0.0.1:{p}"}}\n' for i, p in enumerate(ports)
        )

    deployment = "  - name: {}\n    replicas:\n{}"
    return (
        "deployments:\n"
        + deployment.format("bench", replicas(bench))
        + deployment.format("stream", replicas(stream))
    )


def nginx_conf(tmp: Path, one: int, everyone: int, engines: list[int]) -> str:
    temp = " ".join(
        f"{kind}_temp_path {tmp}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    servers = "".join(f"server 127.0.0.1:{p}; " for p in engines)
    location = (
        'location / { proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; '
        "proxy_pass http://%s; }"
    )
    return f"""worker_processes 1; daemon off; pid {tmp}/nginx.pid; error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 16384; }}
http {{ access_log off; {temp}
  upstream one {{ server 127.0.0.1:{engines[0]}; keepalive 512; }}
  upstream all {{ least_conn; {servers} keepalive 512; }}
  server {{ listen 127.0.0.1:{one}; {location % "one"} }}
  server {{ listen 127.0.0.1:{everyone}; {location % "all"} }}
}}
"""


# -- wrk ---------------------------------------------------------------------------------------------
def parse_wrk(text: str) -> WrkResult:
    """Requests/s and errors (non-2xx answers and socket errors) from wrk's report."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = int(non2xx.group(1)) if non2xx else 0
    errors += sum(int(n) for n in sockets.groups()) if sockets else 0
    return WrkResult(float(rps.group(1)) if rps else 0.0, int(total.group(1)) if total else 0, errors)


def wrk(url: str, script: Path, conns: int, seconds: float) -> WrkResult:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "-s", str(script), url + "/v1/completions"]
    return parse_wrk(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of a process and of its live children (nginx's worker), in clock ticks."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0
    for p in [pid, *map(int, children)]:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


def throughput(rig: Rig, script: Path, args: argparse.Namespace) -> Throughput:
    """wrk -c256 against each target in turn, ``--rounds`` times; CPU time per request of the proxies."""
    targets = {
        "direct": (rig.direct, 0),
        "gateway": (rig.gateway, rig.gateway_pid),
        **{name: (url, pid) for name, url, pid in rig.baselines},
        "nginx": (rig.nginx_all, rig.nginx_pid),
    }
    runs: dict[str, list[WrkResult]] = {name: [] for name in targets}
    cpu_us: dict[str, list[float]] = {name: [] for name in targets}
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    for _ in range(args.rounds):
        for name, (url, pid) in targets.items():
            before = cpu_ticks(pid) if pid else 0
            result = wrk(url, script, 256, args.seconds)
            runs[name].append(result)
            if pid and result.requests:
                cpu_us[name].append((cpu_ticks(pid) - before) * tick_us / result.requests)
    return Throughput(
        rps={n: statistics.median(r.rps for r in rs) for n, rs in runs.items()},
        errors=sum(r.errors for rs in runs.values() for r in rs),
        cpu_us={n: statistics.median(v) for n, v in cpu_us.items() if v},
        cpu_range={n: (min(v), max(v)) for n, v in cpu_us.items() if v},
    )


def sse_rate(rig: Rig, args: argparse.Namespace) -> SseRate:
    """Fast-token SSE streams through the gateway and nginx in turn, ``--rounds`` times; events per
    CPU-second of each proxy."""
    targets = {
        "gateway": (rig.gateway, rig.gateway_pid),
        **{name: (url, pid) for name, url, pid in rig.baselines},
        "nginx": (rig.nginx_all, rig.nginx_pid),
    }
    rates: dict[str, list[float]] = {name: [] for name in targets}
    per_cpu: dict[str, list[float]] = {name: [] for name in targets}
    errors = 0
    tick_s = 1 / os.sysconf("SC_CLK_TCK")
    sse_args = (str(args.sse_streams), str(args.sse_tokens), str(args.sse_seconds))
    for _ in range(args.rounds):
        for name, (url, pid) in targets.items():
            before = cpu_ticks(pid)
            result = load_client("sse", sse_args[0], url, *sse_args[1:])
            cpu_s = (cpu_ticks(pid) - before) * tick_s
            errors += result["errors"]
            rates[name].append(result["events"] / result["seconds"])
            per_cpu[name].append(result["events"] / max(cpu_s, tick_s))
    return SseRate(
        events_per_s={n: statistics.median(v) for n, v in rates.items()},
        per_cpu_s={n: statistics.median(v) for n, v in per_cpu.items()},
        errors=errors,
    )


# -- the load client -----------------------------------------------------------------------------------
def load_client(*args: str, timeout: float = 300) -> dict[str, Any]:
    """Run scripts/bench/gateway_load.py with ``args``; its JSON answer."""
    argv = [sys.executable, str(Path(__file__).with_name("gateway_load.py")), *args]
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=timeout, cwd=REPO)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- the bench -----------------------------------------------------------------------------------------
@contextmanager
def stack(tmp: Path, args: argparse.Namespace) -> Iterator[Rig]:
    """Engines, gateway and nginx running."""
    bench, stream = [free_port() for _ in range(args.engines)], [free_port() for _ in range(2)]
    gw, one, everyone = free_port(), free_port(), free_port()
    from hpcserve.serving.gateway import hash_key

    (tmp / "keys.yaml").write_text(f"keys:\n  - {{id: bench, owner: bench, sha256: {hash_key(KEY)}}}\n")
    routes = tmp / "routes.yaml"
    routes.write_text(routes_yaml(bench, stream))
    (tmp / "nginx.conf").write_text(nginx_conf(tmp, one, everyone, bench))
    with ExitStack() as procs:
        for i, port in enumerate(bench + stream):
            model, decode = ("bench", 0.0) if i < len(bench) else ("stream", 200.0)
            procs.enter_context(process(engine_argv(port, model, decode), tmp / f"engine-{port}.log"))
        gw_proc = procs.enter_context(process(gateway_argv(gw, tmp), tmp / "gateway.log"))
        baselines = [baseline(procs, tree, tmp) for tree in args.baseline_worktree]
        nginx = ["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "nginx-error.log")]
        nginx_proc = procs.enter_context(process(nginx, tmp / "nginx.log"))
        for port in [*bench, *stream, gw, one]:
            wait_http(f"http://127.0.0.1:{port}/health")
        for _, url, _ in baselines:
            wait_http(f"{url}/health")
        at = "http://127.0.0.1:"
        urls = (f"{at}{bench[0]}", f"{at}{gw}", f"{at}{one}", f"{at}{everyone}")
        yield Rig(*urls, routes, bench, stream, gw_proc.pid, nginx_proc.pid, tuple(baselines))


def baseline(procs: ExitStack, tree: Path, tmp: Path) -> tuple[str, str, int]:
    """A gateway run from the hpcserve checkout ``tree`` (its own code, the bench's engines, keys and
    routes): its name in the report, URL and pid."""
    tree, port = tree.resolve(), free_port()
    env = {**os.environ, "PYTHONPATH": str(tree)}
    log = tmp / f"gateway-{tree.name}.log"
    proc = procs.enter_context(process(gateway_argv(port, tmp), log, tree, env))
    return f"base:{tree.name}", f"http://127.0.0.1:{port}", proc.pid


def gateway_argv(port: int, tmp: Path) -> list[str]:
    """``hpcserve gateway`` on ``port`` with the bench's keys and routes files, no /metrics listener."""
    return [sys.executable, "-m", "hpcserve", "gateway", "--host", "127.0.0.1", "--port", str(port),
            "--keys", str(tmp / "keys.yaml"), "--routes", str(tmp / "routes.yaml"),
            "--metrics-listen", "off"]  # fmt: skip


def bench(args: argparse.Namespace) -> None:
    ensure_tools()
    with tempfile.TemporaryDirectory(prefix="hpcserve-gwbench-") as name, stack(Path(name), args) as rig:
        script = Path(name) / "post.lua"
        script.write_text(WRK_LUA % (BODY % ("bench", 8), KEY))
        if "latency" in args.loads:
            report_latency(latency(rig, args), args)
        rig.route_to(args.engines)
        if "rps" in args.loads:
            print(f"req/s: wrk -t1 -c256; gateway and nginx over {args.engines} engines, direct to one",
                  flush=True)  # fmt: skip
            report_rps(throughput(rig, script, args))
        if "sse" in args.loads:
            print(f"SSE: {args.sse_streams} concurrent {args.sse_tokens}-token streams, gateway and nginx "
                  f"over {args.engines} engines", flush=True)  # fmt: skip
            report_sse(sse_rate(rig, args))
        if "streams" in args.loads:
            print(f"streams: {args.streams} concurrent SSE streams through the gateway", flush=True)
            report_streams(load_client("streams", str(args.streams), rig.gateway), args)


def latency(rig: Rig, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """p50 and p99 (ms) per target (direct, gateway, nginx, all in front of engine 0), and errors."""
    rig.route_to(1)
    print(
        f"latency: {args.rate:g} req/s open loop, 8-token completions, all in front of engine 0", flush=True
    )
    urls = [rig.direct, rig.gateway, rig.nginx_one]
    result = load_client("latency", str(args.rate), str(args.seconds), str(args.rounds), *urls)
    names = dict(zip(urls, ("direct", "gateway", "nginx"), strict=True))
    return {
        "p50": {names[u]: v for u, v in result["p50"].items()},
        "p99": {names[u]: v for u, v in result["p99"].items()},
        "errors": {"all": result["errors"]},
    }


def report_latency(result: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    p50, p99 = result["p50"], result["p99"]
    print(f"\n{'target':9} {'p50 ms':>7} {'p99 ms':>7}")
    for name in ("direct", "gateway", "nginx"):
        print(f"{name:9} {p50[name]:7.3f} {p99[name]:7.3f}")
    added50, added99 = p50["gateway"] - p50["direct"], p99["gateway"] - p99["direct"]
    nginx50, nginx99 = p50["nginx"] - p50["direct"], p99["nginx"] - p99["direct"]
    errors = result["errors"]["all"]
    print(f"added latency: gateway p50 {added50:+.3f} ms, p99 {added99:+.3f} ms; "
          f"nginx p50 {nginx50:+.3f} ms, p99 {nginx99:+.3f} ms; errors: {errors:.0f}")  # fmt: skip
    print(f"{verdict(added50 <= GOALS['p50_ms'])}  added p50 <= {GOALS['p50_ms']:g} ms")
    print(f"{verdict(added99 <= GOALS['p99_ms'])}  added p99 <= {GOALS['p99_ms']:g} ms\n", flush=True)


def report_rps(rate: Throughput) -> None:
    print(f"\n{'target':14} {'req/s':>7} {'/nginx':>6} {'CPU us/req':>10} (lowest-highest)")
    for name in rate.rps:
        cpu = f"{rate.cpu_us[name]:10.1f}" if name in rate.cpu_us else f"{'-':>10}"
        low, high = rate.cpu_range.get(name, (0.0, 0.0))
        spread = f" ({low:.1f}-{high:.1f})" if name in rate.cpu_range else ""
        share = rate.rps[name] / max(rate.rps["nginx"], 1e-9)
        print(f"{name:9} {rate.rps[name]:7.0f} {share:6.2f} {cpu}{spread}")
    ratio = rate.rps["gateway"] / max(rate.rps["nginx"], 1e-9)
    direct_ratio = rate.rps["gateway"] / max(rate.rps["direct"], 1e-9)
    print(f"req/s: gateway/nginx {ratio:.2f}, gateway/direct {direct_ratio:.2f} (direct: one engine); "
          f"errors under wrk: {rate.errors}")  # fmt: skip
    print(
        f"{verdict(ratio >= GOALS['rps_ratio'])}  gateway >= {GOALS['rps_ratio']:g}x nginx req/s\n",
        flush=True,
    )


def report_streams(streams: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"streams: {streams['ok']} ok, {streams['errors']} errors, peak {streams['peak']} open at once, "
          f"{streams['seconds']:.1f} s")  # fmt: skip
    ok_streams = streams["errors"] == 0 and streams["ok"] == args.streams
    print(f"{verdict(ok_streams)}  0 errors at {args.streams} concurrent streams")


def report_sse(sse: SseRate) -> None:
    ratio = sse.per_cpu_s["gateway"] / max(sse.per_cpu_s["nginx"], 1e-9)
    for name in sse.per_cpu_s:
        print(f"SSE {name:8} {sse.events_per_s[name]:9.0f} events/s {sse.per_cpu_s[name]:9.0f} events/CPU-s "
              f"{sse.per_cpu_s[name] / max(sse.per_cpu_s['nginx'], 1e-9):5.2f}x nginx")  # fmt: skip
    print(f"SSE events/CPU-s gateway/nginx {ratio:.2f}; errors: {sse.errors}")
    print(
        f"{verdict(ratio >= GOALS['sse_ratio'])}  gateway >= {GOALS['sse_ratio']:g}x nginx SSE events/CPU-s",
        end="\n\n",
        flush=True,
    )


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not (REPO / "hpcserve" / "enginesim" / "server.py").exists():
        raise SystemExit("the engine simulator (hpcserve/enginesim/server.py) is not there yet")
    started = time.monotonic()
    bench(args)
    print(f"\n(bench took {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
