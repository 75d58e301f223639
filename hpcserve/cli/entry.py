"""The ``hpcserve`` console script.

``hpcserve ps`` is run in loops and scripts, and on a busy cluster most of its time is slurmctld answering
squeue. So for an unfiltered ``ps`` the entry point starts squeue first, before click and hpcserve's
models load; the command then reads the output of the already running squeue through the same runner.
Exactly ``ps --json`` skips click as well (hpcserve/cli/fast_ps.py).
"""

from __future__ import annotations

import sys

_PRESTART_FLAGS = frozenset({"--json"})


def main() -> None:
    args = sys.argv[1:]
    runner = None
    if args[:1] == ["ps"] and set(args[1:]) <= _PRESTART_FLAGS:
        import gc

        gc.disable()  # a short-lived process building thousands of records: cycle collection only costs
        from hpcserve.slurm.commands import squeue_argv, squeue_env
        from hpcserve.slurm.runner import DEFAULT_TIMEOUT_S, SubprocessRunner

        runner = SubprocessRunner()
        runner.prestart(squeue_argv(None), timeout=DEFAULT_TIMEOUT_S, env=squeue_env())
        if args[1:] == ["--json"]:
            from hpcserve.cli.fast_ps import ps_json

            ps_json(runner)  # exits
    from hpcserve.cli.main import main as run_cli

    run_cli(args, runner=runner)
