"""The soak's faults, on a schedule that scales with the soak's length, and its watcher (the memory of each
gateway and service, sampled from /proc every few seconds). See soak.py for how to run the soak.

The 30-minute schedule (minutes from the start of the load; a shorter soak compresses it proportionally): 5 a
replica's job cancelled (``scancel``, the engine drains), 7 the node of a replica drained (``scontrol update
... state=drain reason=soak``), 10 a replica killed hard (its engine's process -9, as a crash kills it, and
``scancel --signal=KILL --full``: its streams are cut), 11 the node resumed, 13 slurmctld restarted, 15 a
replica cancelled, 17 the acting service killed with -9 (the standby takes the lease; the killed one is
started again as the standby), 20 a replica killed hard, 22 one gateway restarted (SIGTERM, then started on
the same port), 25 a replica cancelled. Replicas have a 4-minute time limit throughout, so the handover before
the limit happens too.
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from soak_rig import Rig, run, slurmctld_pidfile, start_slurmctld, stop, wait_for

SCHEDULE_MIN = ((5.0, "cancel-replica"), (7.0, "drain-node"), (10.0, "kill-replica"), (11.0, "resume-node"),
                (13.0, "restart-slurmctld"), (15.0, "cancel-replica"), (17.0, "kill-service"),
                (20.0, "kill-replica"), (22.0, "restart-gateway"), (25.0, "cancel-replica"))  # fmt: skip
FULL_MIN = 30.0
SAMPLE_S = 5.0


@dataclass(frozen=True)
class Fault:
    at_s: float
    kind: str


def plan(minutes: float) -> list[Fault]:
    """The schedule for a soak of ``minutes``: the 30-minute one scaled to it; past 30 minutes, a replica
    cancelled or killed every further 5 minutes."""
    scale = min(minutes, FULL_MIN) / FULL_MIN
    faults = [Fault(at * scale * 60, kind) for at, kind in SCHEDULE_MIN]
    extra, at = 0, FULL_MIN + 5
    while at < minutes:
        faults.append(Fault(at * 60, "kill-replica" if extra % 2 else "cancel-replica"))
        extra, at = extra + 1, at + 5
    return faults


@dataclass
class Done:
    """One fault as it happened: when (seconds into the load), what, on what, how long until things were
    whole again (``took_s``), and whether it worked."""

    at_s: float
    kind: str
    detail: str = ""
    took_s: float | None = None
    ok: bool = True


@dataclass
class Faults:
    """Runs the schedule against ``rig`` on a thread of its own; ``done`` is the log."""

    rig: Rig
    t0: float
    done: list[Done] = field(default_factory=list)
    stopped: threading.Event = field(default_factory=threading.Event)
    next_at_s: float = float("inf")

    def now(self) -> float:
        return time.monotonic() - self.t0

    def run(self, schedule: list[Fault]) -> None:
        for n, fault in enumerate(schedule):
            if self.stopped.wait(max(0.0, fault.at_s - self.now())):
                return
            self.next_at_s = schedule[n + 1].at_s if n + 1 < len(schedule) else float("inf")
            entry = Done(round(self.now(), 1), fault.kind)
            self.done.append(entry)
            try:
                self.act(fault.kind, entry)
            except Exception as exc:  # a fault that could not be made is reported, and the soak goes on
                entry.ok, entry.detail = False, f"{entry.detail} {exc!r}".strip()
            print(f"[{entry.at_s:7.1f} s] {entry.kind}: {entry.detail}"
                  f"{'' if entry.took_s is None else f' ({entry.took_s:.1f} s)'}", flush=True)  # fmt: skip

    def act(self, kind: str, entry: Done) -> None:
        actions: dict[str, Callable[[Done], None]] = {
            "cancel-replica": lambda e: self.kill_replica(e, hard=False),
            "kill-replica": lambda e: self.kill_replica(e, hard=True),
            "drain-node": self.drain_node,
            "resume-node": self.resume_node,
            "restart-slurmctld": self.restart_slurmctld,
            "kill-service": self.kill_service,
            "restart-gateway": self.restart_gateway,
        }
        actions[kind](entry)

    def _until(self, check: Callable[[], bool], timeout: float) -> float | None:
        """Seconds until ``check`` held (None: not within ``timeout``, before the next fault is due, or before
        the soak ended)."""
        start = time.monotonic()
        timeout = min(timeout, self.next_at_s - self.now())
        while time.monotonic() - start < timeout and not self.stopped.is_set():
            if check():
                return round(time.monotonic() - start, 1)
            time.sleep(0.5)
        return None

    def kill_replica(self, entry: Done, hard: bool) -> None:
        """Cancel (or kill) the job of the youngest ready replica, as root (the older ones live on to their
        handover before the time limit); ``took_s``: until the deployment has all its replicas ready again."""
        ready = self.rig.ready()
        if not ready:
            raise RuntimeError("no ready replica to kill")
        victim = max(ready, key=lambda r: str(r.started_at or ""))
        job = str(victim.job_id)
        argv = ["scancel", "--signal=KILL", "--full", job] if hard else ["scancel", job]
        engines = engine_pids(victim.port) if hard else []
        for pid in engines:  # a crash: Slurm's own KILL leaves the engine child a SIGTERM, and it drains
            os.kill(pid, signal.SIGKILL)
        done = run(argv)
        entry.detail = f"job {victim.job_id} (replica {victim.index} on {victim.host}): {' '.join(argv[:-1])}"
        entry.detail += f"; engine pid {engines} killed -9" if hard else ""
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip())
        want = self.rig.settings.replicas  # (during a handover, a successor makes one more for a moment)
        entry.took_s = self._until(
            lambda: len([r for r in self.rig.ready() if str(r.job_id) != job]) >= want, 120
        )
        entry.ok = entry.took_s is not None
        if not entry.ok:
            entry.detail += f"; not whole before the next fault: ready {[r.job_id for r in self.rig.ready()]}"

    def drain_node(self, entry: Done) -> None:
        ready = [r for r in self.rig.ready() if r.host]
        if not ready:
            raise RuntimeError("no ready replica whose node to drain")
        node = str(ready[0].host)
        done = run(["scontrol", "update", f"nodename={node}", "state=drain", "reason=soak"])
        entry.detail = f"{node} (replica {ready[0].index}, job {ready[0].job_id})"
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip())
        self.rig.drained.add(node)

    def resume_node(self, entry: Done) -> None:
        for node in sorted(self.rig.drained):
            done = run(["scontrol", "update", f"nodename={node}", "state=resume"])
            if done.returncode != 0:
                raise RuntimeError(done.stderr.strip())
            self.rig.drained.discard(node)
            entry.detail += f"{node} "

    def restart_slurmctld(self, entry: Done) -> None:
        """SIGTERM slurmctld, wait until it is gone, start it again; ``took_s``: until it answers."""
        pidfile = slurmctld_pidfile()
        pid = int(pidfile.read_text().split()[0])
        start = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        if not wait_for(lambda: not Path(f"/proc/{pid}").exists(), 30, 0.1):
            raise RuntimeError(f"slurmctld {pid} still runs 30 s after SIGTERM")
        entry.ok = start_slurmctld(pidfile)
        entry.took_s = round(time.monotonic() - start, 1)
        entry.detail = f"pid {pid} -> {pidfile.read_text().split()[0]}"

    def kill_service(self, entry: Done) -> None:
        """-9 to the acting service; ``took_s``: until the standby holds the serving lease. The killed one is
        started again, as the standby."""
        slot = self.rig.active_slot()
        if slot is None:
            raise RuntimeError("no service holds the serving lease")
        proc = self.rig.services[slot].proc
        assert proc is not None
        other = self.rig.services[1 - slot].proc
        proc.kill()
        proc.wait()
        took = self._until(lambda: other is not None and self.rig.holder_pid() == other.pid, 120)
        entry.detail = f"service {slot} (pid {proc.pid}) killed; service {1 - slot} took the lease"
        entry.took_s, entry.ok = took, took is not None
        self.rig.start_service(slot)
        self.rig.wait_service(slot)

    def restart_gateway(self, entry: Done) -> None:
        """SIGTERM gateway 1 (requests in flight get 30 s), start it again on the same port; ``took_s``: the
        time it did not accept connections."""
        start = time.monotonic()
        stop(self.rig.gateways[1])
        self.rig.start_gateway(1)
        up = wait_for(lambda: self.rig.gateway_listens(1), 60, 0.1)
        entry.took_s, entry.ok = round(time.monotonic() - start, 1), up
        entry.detail = f"gateway 1 on port {self.rig.gateway_ports[1]}"

    def log(self) -> list[dict[str, Any]]:
        return [asdict(d) for d in self.done]


def engine_pids(port: int | None, owner: str = "alice") -> list[int]:
    """The engine simulator of ``owner`` serving on ``port`` (the nodes share this process table)."""
    uid, want = pwd.getpwnam(owner).pw_uid, [b"--port", b"%d" % (port or 0)]
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            mine = proc.stat().st_uid == uid
        except OSError:
            continue
        pairs = [argv[k : k + 2] for k in range(len(argv) - 1)]
        if mine and b"engine-sim" in argv and want in pairs:
            found.append(int(proc.name))
    return found


ACTION = re.compile(r"deployment \S+: (Launch|Cancel|Forget)\((?:.*reason='([^']*)')?")


def service_actions(root: Path) -> dict[str, int]:
    """What the services did to the replicas, from their logs: launches, and cancels and forgets by reason
    (a cancel for the time limit is a handover)."""
    counts: Counter[str] = Counter()
    for log in sorted(root.glob("service*.log")):
        with log.open(errors="replace") as lines:
            for line in lines:
                if found := ACTION.search(line):
                    counts[f"{found[1]} ({found[2]})" if found[2] else found[1]] += 1
    return dict(counts.most_common())


def rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB (None: gone)."""
    try:
        with Path(f"/proc/{pid}/status").open() as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Memory:
    """Peak RSS per role (gateway 0, gateway 1, the acting service, the standby) overall and per ``bucket_s``
    of the load: bounded by the soak's length, not by the number of samples."""

    bucket_s: float
    peak: dict[str, int] = field(default_factory=dict)
    buckets: dict[str, dict[int, int]] = field(default_factory=dict)
    pids: dict[str, list[int]] = field(default_factory=dict)

    def add(self, role: str, pid: int, at_s: float, kib: int) -> None:
        self.peak[role] = max(self.peak.get(role, 0), kib)
        if pid not in (pids := self.pids.setdefault(role, [])):
            pids.append(pid)  # a new process in the role: a restart or a takeover
        held, bucket = self.buckets.setdefault(role, {}), int(at_s // self.bucket_s)
        held[bucket] = max(held.get(bucket, 0), kib)

    def window_max(self, role: str, start_min: float, end_min: float) -> int:
        """The largest sample from ``start_min`` to ``end_min`` (minutes into the load)."""
        inside = range(int(start_min * 60 // self.bucket_s), int(end_min * 60 // self.bucket_s))
        return max((v for b, v in self.buckets.get(role, {}).items() if b in inside), default=0)


def roles(rig: Rig) -> dict[str, int]:
    """The pid of each role now."""
    found = {f"gateway {n}": p.pid for n, p in enumerate(rig.gateways) if p and p.poll() is None}
    active = rig.active_slot()
    for n, svc in enumerate(rig.services):
        if svc.proc is not None and svc.proc.poll() is None:
            found["service (acting)" if n == active else "service (standby)"] = svc.proc.pid
    return found


def watch(rig: Rig, t0: float, memory: Memory, stopped: threading.Event) -> None:
    """Every ``SAMPLE_S``: the RSS of each role, and the replicas' job ids (for the accounting at the end)."""
    while not stopped.wait(SAMPLE_S):
        at = time.monotonic() - t0
        for role, pid in roles(rig).items():
            kib = rss_kib(pid)
            if kib is not None:
                memory.add(role, pid, at, kib)
        rig.replicas()
