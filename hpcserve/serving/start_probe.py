"""Measuring a replica's start on its node (the I/O side; the data is ``hpcserve.serving.phases``).

The replica job calls these: when its process started (for Slurm's queue wait, which the service works
out from its own submit time), staging the weights on the node's warm tier and how long it took, and,
once the engine runs, how long until ``/health`` answers, until ``/v1/models`` lists the model, and
until one ``max_tokens: 1`` completion comes back (with the engine key, as the gateway would send it).
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcserve.serving.engine_proc import wait_healthy
from hpcserve.serving.phases import Staging, StartPhases

if TYPE_CHECKING:
    from collections.abc import Callable

FIRST_TOKEN_TIMEOUT_S = 60.0
_HELD: list[int] = []  # the warm copies' lock descriptors this replica holds (``staging.hold_warm_copy``)
PROMPT = "Hello"


def process_start_unix() -> float:
    """When this process started, in unix seconds (``/proc``: the job's start, give or take the
    interpreter's); now where ``/proc`` does not say."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(line for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
        return int(boot.split()[1]) + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def timed_staging(stage: Callable[[], Any]) -> Staging:
    """Run ``stage`` (``stage_weights``'s call) and say what it did (its ``StageReport``) and how long."""
    began = time.monotonic()
    report = stage()
    seconds = time.monotonic() - began
    return Staging(report.kind, seconds, report.bytes_copied, report.bytes_hashed)


def stage(spec: Any) -> tuple[Any, Staging]:
    """With a warm tier, copy the weights there first (checked by its manifest) and serve them from
    node-local disk; the spec to serve and what staging did, timed (kind "none" without a warm tier)."""
    if not spec.warm_tier or not Path(spec.model).is_dir():
        return spec, Staging()
    from hpcserve.serving.staging import hold_warm_copy, stage_alone
    from hpcserve.serving.warm_copies import own_folder, warm_copy

    node, user = socket.gethostname(), pwd.getpwuid(os.geteuid()).pw_name
    folder = warm_copy(spec.warm_tier, spec.model, node, user)
    if folder is None:
        return spec, Staging()
    warm = Path(folder)
    own = own_folder(str(spec.warm_tier), node, user)
    # held for the life of the replica: no cleanup removes it under us
    _HELD.append(hold_warm_copy(warm, None if own is None else Path(own)))
    staging = timed_staging(lambda: stage_alone(Path(spec.model), warm))
    return spec.model_copy(update={"model": str(warm)}), staging


def measure_start(
    url: str, proc: subprocess.Popen[bytes], timeout_s: float, model: str, key: str | None, base: StartPhases
) -> StartPhases:
    """Wait for the engine at ``url`` (started just now as ``proc``) to be ready, timing each step; ``base``
    with the engine's phases. Fails as ``wait_healthy`` does; a first token that does not come is
    logged and left unmeasured (an engine that serves no completions, e.g. embeddings, is still ready)."""
    spawned = time.monotonic()
    deadline = spawned + timeout_s
    wait_healthy(url, proc, timeout_s)
    healthy = time.monotonic()
    wait_healthy(url, proc, max(0.0, deadline - healthy), model, key)
    listed = time.monotonic()
    first_token = first_token_s(url, model, key)
    return replace(base, engine_load_s=healthy - spawned, first_healthy_s=listed - healthy,
                   first_token_s=first_token)  # fmt: skip


def first_token_s(
    url: str, model: str, key: str | None, timeout_s: float = FIRST_TOKEN_TIMEOUT_S
) -> float | None:
    """Seconds for one ``max_tokens: 1`` completion of ``model`` at ``url``; None when it fails."""
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(f"{url}/v1/completions", body, headers, method="POST")  # noqa: S310
    began = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 (http only)
            response.read()
            if response.status == 200:
                return time.monotonic() - began
    except OSError as exc:
        print(f"replica: the first-token request failed ({exc}); phase left unmeasured", file=sys.stderr)
    return None
