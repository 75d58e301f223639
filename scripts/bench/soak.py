"""A bounded soak with faults, on loopback and the local Slurm cluster: the Azure LLM code trace (2023)
replayed through two ``hpcserve gateway`` processes to alice's engine-simulator deployment (two replicas, a
4-minute time limit each) served by two ``hpcserve service`` processes on one PostgreSQL database, while
replicas are cancelled and killed, a node is drained and resumed, slurmctld is restarted, the acting service
is killed with -9 and a gateway is restarted (the schedule is in soak_faults.py).

Run as root from the repo root, on the local cluster (source /tmp/hpcserve-mc/env.sh), with PostgreSQL on
127.0.0.1:5432 (trust auth):
    scripts/bench/soak [--minutes 30] [--trace ../shared/traces/azure_llm_2023_code.csv] [--json-out PATH]
    scripts/bench/soak --minutes 6          # short: every fault, the schedule compressed 5x
The trace is read from where it lies (never copied into the repo), replayed ``--compress`` times faster
(2: about 5 requests/s on average, bursts of 50/s) and again from its start when it runs out; prompts are
scaled by ``--prompt-scale`` (0.05: a median of 73 tokens), outputs by ``--output-scale`` and capped at 400
(the trace's median is 13, its longest 1,899). Two requests in three are streamed. Beside the trace,
``--long-streams`` clients stream 400 tokens (4 s) one after another, so that streams are in flight on every
replica whenever a fault strikes.

The report (a table, and JSON with --json-out): requests; errors by cause; p50/p99 TTFT before the first fault
and during the faults; streams cut, each with its error event; peak RSS of each gateway and service (VmRSS
every 5 s) per role (each gateway, the acting service, the standby) and whether it grew after the first 5
minutes (minutes 5-10 against the last 5; a shorter soak compresses both windows as it compresses the faults:
the second sixth against the last sixth, as the first five minutes are process warm-up); the fault log; the
replica jobs' end states from sacct and what the services did to them (their logs). PASS/MISS: 0 errors except
streams in flight on a killed replica, each ending in a clean error event; no memory growth (growth = late max
- early max; a MISS when it is 10% or more of the early max, or 20 MiB or more).

Bounded: a hard deadline (setup + minutes + 10 minutes); whatever happens (Ctrl-C, SIGTERM, an exception),
every process it started is stopped, its replica jobs cancelled, a node it drained resumed, slurmctld
started if it is down, and its database dropped. Always exits 0 once it ran.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak_faults import FULL_MIN, Faults, Memory, plan, service_actions, watch
from soak_load import Client, Histogram, Shape, Stats, arrivals
from soak_rig import NAME, REPO, Rig, Settings, make_rig, run, wait_for

GROWTH_PCT, GROWTH_MIB = 10.0, 20.0
# a cut this soon after a replica was killed (or cancelled: its engine drains for up to 20 s, then Slurm's
# KillWait) was in flight on it
KILL_WINDOW_S = {"kill-replica": 10.0, "cancel-replica": 35.0}
SETUP_S = 360.0
ERRORS_SHOWN = 12


class Deadline(KeyboardInterrupt):
    """The soak's hard deadline passed, or it was told to stop. A KeyboardInterrupt: asyncio lets only that
    and SystemExit out of a task; anything else raised inside one ends only that task."""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="minutes of load (default 30)")
    trace = REPO.parent / "shared" / "traces" / "azure_llm_2023_code.csv"
    p.add_argument("--trace", type=Path, default=trace,
                   help="the trace (default ../shared/traces/azure_llm_2023_code.csv)")  # fmt: skip
    p.add_argument("--compress", type=float, default=2.0, help="times faster than the trace (default 2)")
    p.add_argument("--prompt-scale", type=float, default=0.05, help="prompt tokens x this (default 0.05)")
    p.add_argument("--output-scale", type=float, default=1.0,
                   help="output tokens x this, at most 400 (default 1)")  # fmt: skip
    p.add_argument("--long-streams", type=int, default=4,
                   help="clients streaming 400 tokens on and on, beside the trace (default 4)")  # fmt: skip
    p.add_argument("--max-inflight", type=int, default=512, help="the client's bound (default 512)")
    p.add_argument("--json-out", type=Path, help="write the report as JSON here")
    p.add_argument("--keep-logs", action="store_true", help="keep the services' and gateways' logs")
    args = p.parse_args()
    if not args.trace.is_file():
        p.error(f"--trace {args.trace}: no such file (give the Azure code trace's path)")
    if args.minutes <= 0 or args.compress <= 0:
        p.error("--minutes and --compress must be > 0")
    return args


def _stop(signum: int, _frame: FrameType | None) -> None:
    raise Deadline(f"signal {signal.Signals(signum).name}")


def setup(rig: Rig) -> None:
    """Database, two services (the first takes the lease), alice's deployment and key, two gateways; returns
    once both replicas are ready and each gateway has answered a request."""
    rig.create_database()
    rig.write_sites()
    for slot in (0, 1):
        rig.start_service(slot)
        if not rig.wait_service(slot):
            raise RuntimeError(f"service {slot} did not open its socket; see {rig.root}/service{slot}-1.log")
        if slot == 0 and not wait_for(lambda: rig.active_slot() == 0, 60):
            raise RuntimeError("service 0 did not take the serving lease")
    rig.deploy()
    for n in (0, 1):
        rig.start_gateway(n)
    if not wait_for(lambda: len(rig.ready()) >= rig.settings.replicas, 180, 1.0):
        raise RuntimeError(f"the replicas were not ready in 180 s: {rig.replicas()}")
    for n in (0, 1):
        if not wait_for(lambda n=n: answers(rig, n), 60, 1.0):  # type: ignore[misc]
            raise RuntimeError(f"gateway {n} does not answer; see {rig.root}/gateway{n}-1.log")


def answers(rig: Rig, n: int) -> bool:
    import httpx

    body = {"model": NAME, "max_tokens": 2, "messages": [{"role": "user", "content": "warm"}]}
    try:
        got = httpx.post(rig.urls()[n] + "/v1/chat/completions", json=body, timeout=10,
                         headers={"Authorization": f"Bearer {rig.key}"})  # fmt: skip
    except httpx.HTTPError:
        return False
    return got.status_code == 200


def soak(rig: Rig, args: argparse.Namespace) -> dict[str, Any]:
    """The load and the faults for ``--minutes``; the report."""
    schedule = plan(args.minutes)
    t0 = time.monotonic()
    stats, memory = Stats(first_fault_s=schedule[0].at_s), Memory(bucket_s=max(10.0, args.minutes * 2))
    faults, stopped = Faults(rig, t0), threading.Event()
    threads = [threading.Thread(target=faults.run, args=(schedule,), daemon=True),
               threading.Thread(target=watch, args=(rig, t0, memory, stopped), daemon=True)]  # fmt: skip
    shape = Shape(args.compress, args.prompt_scale, args.output_scale)
    client = Client(rig.urls(), rig.key, NAME, stats, t0, args.max_inflight)
    for thread in threads:
        thread.start()
    interrupted = None
    try:
        sends = arrivals(args.trace, shape, args.minutes * 60)
        asyncio.run(client.replay(sends, args.minutes * 60, args.long_streams))
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM or the deadline: report what ran
        interrupted = repr(exc)
    finally:
        faults.stopped.set()
        stopped.set()
        for thread in threads:
            thread.join(timeout=90)
    return report(args, stats, memory, faults, rig, time.monotonic() - t0) | {"interrupted": interrupted}


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def window(hist: Histogram) -> dict[str, Any]:
    return {"n": hist.count, "p50": ms(hist.quantile(0.5)), "p99": ms(hist.quantile(0.99))}


def judge_cuts(stats: Stats, faults: Faults) -> list[dict[str, Any]]:
    """Each listed cut, marked ``on_killed_replica`` when a replica was cancelled or killed just before."""
    kills = [(d.at_s, d.at_s + KILL_WINDOW_S[d.kind]) for d in faults.done if d.kind in KILL_WINDOW_S]
    for cut in stats.cuts:
        cut["on_killed_replica"] = any(start <= cut["at_s"] <= end for start, end in kills)
    return stats.cuts


def growth(memory: Memory, minutes: float) -> dict[str, dict[str, Any]]:
    """Per role: the early window's max RSS, the last window's, and whether it grew past the threshold."""
    if minutes >= FULL_MIN:
        early, late = (5.0, 10.0), (minutes - 5.0, minutes)
    else:  # the same windows, compressed as the faults are
        early, late = (minutes / 6, minutes / 3), (minutes * 5 / 6, minutes)
    out = {}
    for role in sorted(memory.peak):
        a, b = memory.window_max(role, *early), memory.window_max(role, *late)
        grew = (b - a) / 1024 >= GROWTH_MIB or (a > 0 and (b - a) * 100 / a >= GROWTH_PCT)
        out[role] = {"peak_mib": round(memory.peak[role] / 1024, 1), "early_mib": round(a / 1024, 1),
                     "late_mib": round(b / 1024, 1), "grew": bool(a and b and grew),
                     "windows_min": [list(early), list(late)], "pids": memory.pids[role],
                     "max_mib_per_bucket": {round(b * memory.bucket_s): round(v / 1024, 1)
                                            for b, v in sorted(memory.buckets[role].items())}}  # fmt: skip
    return out


def job_states(ids: set[str]) -> dict[str, int]:
    """The replica jobs' end states (sacct), counted."""
    if not ids:
        return {}
    out = run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(sorted(ids))]).stdout
    return dict(Counter(line.split("|")[1].split()[0] for line in out.splitlines() if "|" in line))


def report(args: argparse.Namespace, stats: Stats, memory: Memory, faults: Faults, rig: Rig,
           elapsed: float) -> dict[str, Any]:  # fmt: skip
    cuts = judge_cuts(stats, faults)
    excused = sum(1 for c in cuts if c["clean"] and c["on_killed_replica"])
    unexplained = stats.cuts_clean - excused
    mem = growth(memory, args.minutes)
    errors = sum(stats.errors.values()) + unexplained
    return {
        "minutes": args.minutes, "elapsed_s": round(elapsed, 1), "trace": str(args.trace),
        "compress": args.compress, "prompt_scale": args.prompt_scale, "output_scale": args.output_scale,
        "requests": {"sent": stats.sent, "ok": stats.ok, "streamed": stats.streamed,
                     "dropped_by_client": stats.dropped, "retried_on_other_gateway": stats.retries,
                     "peak_inflight": stats.peak_inflight},
        "errors": {"total": errors, "by_cause": dict(stats.errors.most_common()),
                   "clean_cuts_not_on_a_killed_replica": unexplained, "first": stats.first_errors},
        "ttft_ms": {"before_faults": window(stats.ttft_before), "during_faults": window(stats.ttft_during),
                    "first_fault_s": stats.first_fault_s},
        "streams_cut": {"total": stats.cuts_total, "clean": stats.cuts_clean, "on_killed_replica": excused,
                        "listed": cuts},
        "memory": mem, "faults": faults.log(), "replica_jobs": job_states(rig.jobs_seen),
        "service_actions": service_actions(rig.root),
        "goals": {"errors": errors == 0, "memory": not any(m["grew"] for m in mem.values())},
    }  # fmt: skip


def print_report(r: dict[str, Any]) -> None:
    q, e, t, c = r["requests"], r["errors"], r["ttft_ms"], r["streams_cut"]
    print(f"\nsoak: {r['minutes']:g} min of load ({r['elapsed_s']:.0f} s), trace x{r['compress']:g}"
          + (f"  INTERRUPTED: {r['interrupted']}" if r["interrupted"] else ""))  # fmt: skip
    print(f"requests  sent {q['sent']}  ok {q['ok']}  streamed {q['streamed']}  retried on the other gateway "
          f"{q['retried_on_other_gateway']}  dropped by the client {q['dropped_by_client']}  peak in flight "
          f"{q['peak_inflight']}")  # fmt: skip
    print(f"errors    {e['total']}" + "".join(f"\n  {n:6d}  {why}" for why, n in e["by_cause"].items())
          + (f"\n  {e['clean_cuts_not_on_a_killed_replica']:6d}  clean cut, no replica killed just before"
             if e["clean_cuts_not_on_a_killed_replica"] else ""))  # fmt: skip
    for err in e["first"][:ERRORS_SHOWN]:
        print(f"  [{err['at_s']:7.1f} s] gateway {err['gateway']} {err['cause']}: {err['detail'][:150]}")
    for label, key in (("before faults", "before_faults"), ("during faults", "during_faults")):
        w = t[key]
        print(f"TTFT {label:<14} n {w['n']:6d}  p50 {w['p50']} ms  p99 {w['p99']} ms")
    print(f"streams cut {c['total']}: clean {c['clean']}, on a killed replica {c['on_killed_replica']}")
    for cut in c["listed"]:
        print(f"  [{cut['at_s']:7.1f} s] gateway {cut['gateway']} clean={cut['clean']} "
              f"killed_replica={cut['on_killed_replica']}  {cut['error'][:150]}")  # fmt: skip
    print("faults")
    for f in r["faults"]:
        took = "" if f["took_s"] is None else f" ({f['took_s']} s)"
        print(f"  [{f['at_s']:7.1f} s] {'ok ' if f['ok'] else 'BAD'} {f['kind']:<18} {f['detail']}{took}")
    first: dict[str, Any] = next(iter(r["memory"].values()), {})
    windows = first.get("windows_min", [])
    print(f"memory (MiB; windows {windows} min)  peak   early   late   grew   pids")
    for role, m in r["memory"].items():
        print(f"  {role:<20} {m['peak_mib']:6.1f} {m['early_mib']:7.1f} {m['late_mib']:6.1f}   "
              f"{m['grew']!s:<5}  {m['pids']}")  # fmt: skip
    kills = sum(1 for f in r["faults"] if f["kind"] == "kill-replica")
    print(f"replica jobs (sacct)  {r['replica_jobs']}  (a hard kill ends FAILED: {kills} hard kills; "
          "TIMEOUT, or FAILED beyond them, ended on their own)")  # fmt: skip
    print(f"service actions (logs)  {r['service_actions']}")
    g = r["goals"]
    verdict = "PASS" if g["errors"] else "MISS"
    print(f"\n0 errors except clean cuts on killed replicas: {e['total']} errors  {verdict}")
    print(f"no memory growth (late max - early max < {GROWTH_PCT:g}% and < {GROWTH_MIB:g} MiB): "
          f"{'PASS' if g['memory'] else 'MISS'}")  # fmt: skip


def main() -> int:
    args = parse_args()
    rig = make_rig(Settings())
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)  # also when started in the background, where SIGINT is ignored
    signal.signal(signal.SIGALRM, _stop)
    signal.alarm(int(SETUP_S + args.minutes * 60 + 600))
    print(f"soak: {args.minutes:g} min, logs in {rig.root}", flush=True)
    try:
        setup(rig)
        print(f"soak: set up (replicas {[r.job_id for r in rig.ready()]}, gateways {rig.urls()})", flush=True)
        result = soak(rig, args)
        print_report(result)
        if args.json_out:
            args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    except (Deadline, KeyboardInterrupt, Exception) as exc:  # report it; the cleanup below always runs
        print(f"soak: stopped early: {exc!r}", file=sys.stderr)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the cleanup is bounded: let it finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for line in rig.close(args.keep_logs):
            print(f"cleanup: {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
