"""Submission throughput on the local cluster: hpcserve's submission paths against a raw sbatch loop.

Run from the repo root: scripts/bench/submit_throughput [--n 1000] [--callable-n 100] [--partition all]
(the wrapper runs this file with .venv/bin/python). Needs SLURM_CONF (source /tmp/hpcserve-mc/env.sh).
Every job is submitted HELD under one unique name and cancelled by that name at the end.

(a) raw ``sbatch --parsable --hold ... --wrap true``, one process per job;
(b) against a raw ``sbatch --hold ... jobtemplates/model-stage.sbatch`` loop: hpcserve's whole template
    path through its API (policy, placement, validation, rendering, sbatch; hpcserve_submit);
(c) on --callable-n jobs: hpcserve's callable path (CallableSubmitter.submit), submitit's own per-job
    ``Executor.submit()`` in a loop (with the time split into its throttle sleep, sbatch and the rest), and
    submitit's ``batch()`` (one array per block); raw sbatch runs again in this phase as its reference.
The methods alternate in blocks, in rotating order, so that the drift of a busy 2-core machine hits all
alike. Always exits 0: it reports PASS/MISS against the goal, it does not test.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit

from hpcserve.config import load_policy, load_site_config
from hpcserve.config.policy import JobClassName
from hpcserve.jobs.callables import CallableSubmitter, executor_parameters
from hpcserve.jobs.spec import JobRequest, ResolvedJob
from hpcserve.jobs.submit import Submitter
from hpcserve.jobs.templates import load_template
from hpcserve.slurm.cli_backend import CliSlurmClient

RATIO_GOAL = 1.2
REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "jobtemplates"
TEMPLATE = "model-stage"  # a one-node template; the jobs are held, so it never runs
SITE, POLICY = "site_configs/minicluster.yaml", "policies/default.yaml"
SCRIPT = "#!/bin/bash\ntrue\n"
Method = Callable[[int], None]  # submits k held jobs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="jobs for (a) and (b) each (default 1000)")
    p.add_argument("--callable-n", type=int, default=100, help="jobs for each method of (c) (default 100)")
    p.add_argument("--block", type=int, default=25, help="jobs per block before switching method (25)")
    p.add_argument("--partition", default="all", help="partition for the held jobs (default all)")
    args = p.parse_args(argv)
    if min(args.n, args.callable_n, args.block) < 1:
        p.error("--n, --callable-n and --block must be >= 1")
    return args


def noop(i: int) -> int:
    """The callable of (c); held jobs never run it."""
    return i


def resolved(name: str, partition: str) -> ResolvedJob:
    """What policy and placement hand over for a 1-node, 5-minute job (built directly here)."""
    request = JobRequest(job_class=JobClassName.BATCH, name=name, user="bench", partition=partition)
    return ResolvedJob(
        request=request, partition=partition, qos="normal", time_s=300, preemptible=False, grace_s=60,
        tag=f"hpcserve:bench:{name}",
    )  # fmt: skip


def sbatch_loop(name: str, partition: str, *what: str) -> Method:
    """One plain sbatch process per held job, as a shell loop would run it."""
    argv = [
        "sbatch",
        "--parsable",
        "--hold",
        "-J",
        name,
        "-p",
        partition,
        "-t",
        "5",
        "-o",
        "/dev/null",
        *what,
    ]

    def submit(k: int) -> None:
        for _ in range(k):
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"sbatch failed: {proc.stderr.strip()}")

    return submit


def raw_sbatch(name: str, partition: str) -> Method:
    return sbatch_loop(name, partition, "--wrap", "true")


def raw_template(name: str, partition: str) -> Method:
    """Plain sbatch of the template file, as a user would without hpcserve."""
    return sbatch_loop(name, partition, str(TEMPLATES / f"{TEMPLATE}.sbatch"))


def hpcserve_submit(name: str, partition: str) -> Method:
    """``hpcserve submit`` through its API, one job per call, each paying the whole path: the policy
    check (with the user's GPUs counted), placement, parameter validation, rendering and sbatch.
    The cluster is read once (``Submitter`` keeps its view), as one CLI call or service tick would."""
    site, policy = load_site_config(REPO / SITE), load_policy(REPO / POLICY)
    submitter = Submitter(CliSlurmClient(), site, policy)
    template = load_template(TEMPLATE, TEMPLATES)
    request = JobRequest(job_class=JobClassName.BATCH, name=name, user="bench", partition=partition,
                         time_s=300, output="/dev/null", hold=True)  # fmt: skip
    submitter.view()

    def submit(k: int) -> None:
        for _ in range(k):
            submitter.submit(submitter.plan_template(template, {"MODEL": "bench"}, request))

    return submit


def hpcserve_callable(name: str, partition: str, folder: Path) -> Method:
    submitter, job = CallableSubmitter(extra_sbatch={"hold": True}), resolved(name, partition)

    def submit(k: int) -> None:
        for i in range(k):
            submitter.submit(job, noop, i, folder=folder / "%j")

    return submit


class TimedExecutor(submitit.SlurmExecutor):
    """submitit's SlurmExecutor, unchanged but for clocks around its throttle and its sbatch call."""

    throttle_s = 0.0
    sbatch_s = 0.0

    def _throttle(self) -> None:
        t0 = time.perf_counter()
        super()._throttle()
        self.throttle_s += time.perf_counter() - t0

    def _submit_command(self, command: str) -> submitit.Job[Any]:
        t0 = time.perf_counter()
        job = super()._submit_command(command)
        self.sbatch_s += time.perf_counter() - t0
        return job


def submitit_loop(executor: TimedExecutor) -> Method:
    def submit(k: int) -> None:
        for i in range(k):
            executor.submit(noop, i)

    return submit


def submitit_batch(name: str, partition: str, folder: Path) -> Method:
    submitter, job = CallableSubmitter(extra_sbatch={"hold": True}), resolved(name, partition)

    def submit(k: int) -> None:
        submitter.submit_array(job, noop, [(i,) for i in range(k)], folder / "%j")

    return submit


def rounds(methods: dict[str, Method], n: int, block: int) -> dict[str, float]:
    """Each method submits n jobs in blocks, the order rotating each round; returns seconds per job."""
    spent = dict.fromkeys(methods, 0.0)
    names = list(methods)
    for r, start in enumerate(range(0, n, block)):
        k = min(block, n - start)
        for label in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            methods[label](k)
            spent[label] += time.perf_counter() - t0
    return {label: total / n for label, total in spent.items()}


def row(label: str, n: int, per_job: float, raw: float, note: str = "") -> None:
    print(f"  {label:<34} {n:>6} {per_job * 1000:>10.2f} ms {per_job / raw:>8.2f}x  {note}")


def template_phase(args: argparse.Namespace, name: str) -> float:
    print(f"\n(a)/(b) {args.n} jobs each, blocks of {args.block}:")
    methods = {"raw": raw_template(name, args.partition), "hpcserve": hpcserve_submit(name, args.partition)}
    for submit in methods.values():
        submit(1)  # warm-up: also checks that it works
    got = rounds(methods, args.n, args.block)
    ratio = got["hpcserve"] / got["raw"]
    row("(a) raw sbatch loop", args.n, got["raw"], got["raw"])
    row("(b) hpcserve template submit", args.n, got["hpcserve"], got["raw"], f"goal <= {RATIO_GOAL}")
    return ratio


def callable_phase(args: argparse.Namespace, name: str, folder: Path) -> float:
    n = args.callable_n
    print(f"\n(c) {n} jobs each, blocks of {args.block}:")
    executor = TimedExecutor(folder=folder / "%j")
    executor.update_parameters(**executor_parameters(resolved(name, args.partition), extra={"hold": True}))
    methods = {
        "raw": raw_sbatch(name, args.partition),
        "callable": hpcserve_callable(name, args.partition, folder),
        "submitit": submitit_loop(executor),
        "batch": submitit_batch(name, args.partition, folder),
    }
    for submit in methods.values():
        submit(1)
    executor.throttle_s = executor.sbatch_s = 0.0
    got = rounds(methods, n, args.block)
    raw = got["raw"]
    row("raw sbatch loop (reference)", n, raw, raw)
    row("(c) hpcserve callable submit", n, got["callable"], raw)
    split = [executor.throttle_s / n, executor.sbatch_s / n]
    note = "throttle sleep {:.1f} ms + sbatch and its files {:.1f} ms + rest {:.1f} ms".format(
        *(s * 1000 for s in [*split, got["submitit"] - sum(split)])
    )
    row("    submitit Executor.submit() loop", n, got["submitit"], raw, note)
    row("    submitit batch() arrays", n, got["batch"], raw, f"per item, arrays of {args.block}")
    return got["callable"] / raw


def count_queued(name: str) -> int:
    out = subprocess.run(["squeue", "-h", "-r", "-n", name, "-o", "%i"], capture_output=True, text=True)
    return len(out.stdout.split())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill PID cleans up like Ctrl-C
    name = f"hpcserve-bench-{uuid.uuid4().hex[:12]}"
    folder = Path(tempfile.mkdtemp(prefix="hpcserve-bench-"))
    print(f"job name {name}: held jobs in partition {args.partition}; per-job times, ratio to raw sbatch")
    try:
        template_ratio = template_phase(args, name)
        callable_ratio = callable_phase(args, name, folder)
        print(f"\nqueued under {name}: {count_queued(name)} (held)")
        verdict = "PASS" if template_ratio <= RATIO_GOAL else "MISS"
        goal = f"(goal <= {RATIO_GOAL}) {verdict}"
        print(f"ratio hpcserve template submit / raw sbatch = {template_ratio:.2f} {goal}")
        print(f"ratio hpcserve callable submit / raw sbatch = {callable_ratio:.2f}")
    finally:
        t0 = time.perf_counter()
        subprocess.run(["scancel", "-n", name], capture_output=True, check=False)
        shutil.rmtree(folder, ignore_errors=True)
        print(f"cancelled jobs named {name} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
