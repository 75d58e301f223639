"""Benchmark `hpcserve ps --json` and `hpcserve --help` against plain squeue on the local cluster.

Run from the repo root: scripts/bench/cli_vs_squeue [--jobs 10000] [--runs 7] [--partition all] [--keep]
(the wrapper runs this file with .venv/bin/python). Needs SLURM_CONF (source /tmp/hpcserve-mc/env.sh).
It submits N held jobs under one unique name, times each command as the median of R runs (one untimed
warm-up run first, which also checks that the command works), and cancels its jobs at the end.
Always exits 0: it reports PASS/MISS against the goals, it does not test.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RATIO_GOAL = 1.5
HELP_GOAL_MS = 300
TIMEOUT_S = 300.0
SBATCH = ["sbatch", "-H", "--parsable", "-t", "5", "--wrap", "true", "-o", "/dev/null"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=10000, help="held jobs to submit (default 10000)")
    p.add_argument("--runs", type=int, default=7, help="timed runs per command, at least 5 (default 7)")
    p.add_argument("--partition", default="all", help="partition for the held jobs (default all)")
    p.add_argument("--hpcserve", default=str(Path(sys.executable).parent / "hpcserve"), help="hpcserve CLI")
    p.add_argument("--keep", action="store_true", help="do not cancel the jobs at the end")
    args = p.parse_args(argv)
    if args.runs < 5 or args.jobs < 1:
        p.error("--runs must be >= 5 and --jobs >= 1")
    return args


def run(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, timeout=TIMEOUT_S, check=False)


def last_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    lines = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
    return f"rc={proc.returncode}: {lines[-1] if lines else '(no output)'}"


def timed(argv: list[str], runs: int) -> tuple[list[float], bytes]:
    """Warm-up run (must exit 0, else RuntimeError), then `runs` timed runs; returns times and last stdout."""
    probe = run(argv)
    if probe.returncode != 0:
        raise RuntimeError(last_line(probe))
    times, out = [], b""
    for _ in range(runs):
        t0 = time.perf_counter()
        out = run(argv).stdout
        times.append(time.perf_counter() - t0)
    return times, out


def submit_one(argv: list[str]) -> None:
    for attempt in range(5):  # slurmctld may answer EAGAIN under load; back off and retry
        proc = run(argv)
        if proc.returncode == 0:
            return
        time.sleep(0.2 * 2**attempt)
    raise RuntimeError(f"sbatch failed: {last_line(proc)}")


def count_queued(name: str) -> int:
    return len(run(["squeue", "-h", "-a", "-r", "-n", name, "-o", "%A"]).stdout.split())


def submit_jobs(name: str, n: int, partition: str, workers: int = 4) -> None:
    argv, t0 = [*SBATCH, "-J", name, "-p", partition], time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for i, _ in enumerate(pool.map(submit_one, [argv] * n), start=1):
            if i % 1000 == 0 or i == n:
                print(f"  submitted {i}/{n} ({time.perf_counter() - t0:.1f} s)", flush=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for _ in range(60):
        queued = count_queued(name)
        if queued >= n:
            took = time.perf_counter() - t0
            print(f"  all {queued} queued after {took:.1f} s ({n / took:.0f} jobs/s)")
            return
        time.sleep(1)
    raise RuntimeError(f"only {queued} of {n} jobs named {name} are queued")


def count_ps_jobs(out: bytes) -> int:
    data = json.loads(out)
    jobs = data.get("jobs", []) if isinstance(data, dict) else data
    return len(jobs)


def measure(label: str, argv: list[str], runs: int, rows: list[tuple[str, list[float] | None, str]]) -> bytes:
    """Times argv; a failure becomes a 'not available' row. Returns the last stdout (empty on failure)."""
    try:
        times, out = timed(argv, runs)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        rows.append((label, None, f"not available ({exc})"))
        return b""
    rows.append((label, times, ""))
    return out


def import_top(python: str, n: int = 10) -> list[tuple[int, str]]:
    proc = run([python, "-X", "importtime", "-m", "hpcserve", "--help"])
    found: list[tuple[int, str]] = []
    for line in proc.stderr.decode(errors="replace").splitlines():
        parts = line.removeprefix("import time:").split("|")
        if line.startswith("import time:") and len(parts) == 3 and parts[1].strip().isdigit():
            found.append((int(parts[1]), parts[2].strip()))
    if proc.returncode != 0:
        print(f"  (python -m hpcserve --help failed: {last_line(proc)})")
    return sorted(found, reverse=True)[:n]


def median_ms(times: list[float] | None) -> float | None:
    return statistics.median(times) * 1000 if times else None


def print_table(rows: list[tuple[str, list[float] | None, str]]) -> None:
    print(f"\n{'command':<44} {'median':>10} {'min':>10} {'max':>10}  note")
    for label, times, note in rows:
        if times is None:
            print(f"{label:<44} {'-':>10} {'-':>10} {'-':>10}  {note}")
        else:
            cells = [f"{t * 1000:.1f} ms" for t in (statistics.median(times), min(times), max(times))]
            print(f"{label:<44} {cells[0]:>10} {cells[1]:>10} {cells[2]:>10}  {note}")


def verdict(value: float | None, goal: float) -> str:
    return "n/a (not available)" if value is None else ("PASS" if value <= goal else "MISS")


def compile_bytecode(python: str) -> None:
    """As a pip install does: without .pyc files (PYTHONDONTWRITEBYTECODE) every run recompiles hpcserve."""
    import hpcserve

    run([python, "-m", "compileall", "-q", str(Path(hpcserve.__file__).parent)])


def interleaved(a: list[str], b: list[str], runs: int) -> tuple[list[float], list[float], bytes]:
    """Alternate a and b, so that drift on a busy machine hits both alike; returns times and b's stdout."""
    for argv in (a, b):
        if (probe := run(argv)).returncode != 0:
            raise RuntimeError(f"{argv[0]}: {last_line(probe)}")
    ta: list[float] = []
    tb: list[float] = []
    out = b""
    for _ in range(runs):
        for argv, times in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            out = run(argv).stdout
            times.append(time.perf_counter() - t0)
    return ta, tb, out


def bench(args: argparse.Namespace) -> None:
    rows: list[tuple[str, list[float] | None, str]] = []
    compile_bytecode(sys.executable)
    cli = Path(args.hpcserve).name
    try:
        squeue, ps = ["squeue", "-h", "-a", "-r"], [args.hpcserve, "ps", "--json"]
        sq_t, ps_t, ps_out = interleaved(squeue, ps, args.runs)
        rows += [("squeue -h -a -r", sq_t, ""), (f"{cli} ps --json", ps_t, "")]
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        rows += [("squeue -h -a -r", None, ""), (f"{cli} ps --json", None, f"not available ({exc})")]
        ps_out = b""
    if ps_out:
        try:
            got = count_ps_jobs(ps_out)
            rows[-1] = (
                *rows[-1][:2],
                f"{got} jobs, {'ok' if got >= args.jobs else 'FEWER than'} {args.jobs}",
            )
        except (ValueError, AttributeError) as exc:
            rows[-1] = (*rows[-1][:2], f"unparsable JSON: {exc}")
    sq_out = measure("squeue --json", ["squeue", "--json"], args.runs, rows)
    if sq_out:
        rows[-1] = (*rows[-1][:2], f"{len(sq_out) / 1e6:.1f} MB, {count_ps_jobs(sq_out)} jobs")
    py = sys.executable
    measure(f"{cli} --help", [args.hpcserve, "--help"], args.runs, rows)
    measure("python -c pass", [py, "-c", "pass"], args.runs, rows)
    measure("python -c 'import hpcserve.cli.main'", [py, "-c", "import hpcserve.cli.main"], args.runs, rows)
    print_table(rows)
    print("\npython -X importtime -m hpcserve --help, top 10 cumulative:")
    for cum, mod in import_top(py):
        print(f"  {cum / 1000:8.1f} ms  {mod}")
    squeue_ms, ps_ms, help_ms = (median_ms(rows[i][1]) for i in (0, 1, 3))
    ratio = ps_ms / squeue_ms if ps_ms is not None and squeue_ms else None
    ratio_s = "n/a" if ratio is None else f"{ratio:.2f}"
    help_s = "n/a" if help_ms is None else f"{help_ms:.0f}"
    print(f"\nratio ps_json/squeue = {ratio_s} (goal <= {RATIO_GOAL})  {verdict(ratio, RATIO_GOAL)}")
    print(
        f"hpcserve --help start = {help_s} ms (goal <= {HELP_GOAL_MS} ms)  {verdict(help_ms, HELP_GOAL_MS)}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill PID cleans up like Ctrl-C
    name = f"hpcserve-bench-{uuid.uuid4().hex[:12]}"
    print(f"job name {name}: {args.jobs} held jobs in partition {args.partition}, {args.runs} runs each")
    try:
        submit_jobs(name, args.jobs, args.partition)
        print(f"  whole queue: {len(run(['squeue', '-h', '-a', '-r']).stdout.splitlines())} jobs")
        bench(args)
    finally:
        if args.keep:
            print(f"\n--keep: jobs left queued; cancel with: scancel -n {name}")
        else:
            t0 = time.perf_counter()
            proc = run(["scancel", "-n", name])
            print(f"\ncancelled jobs named {name} in {time.perf_counter() - t0:.1f} s ({last_line(proc)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
