"""The soak's processes: a scratch PostgreSQL database, two ``hpcserve service`` processes on it (one acting,
one standing by), two ``hpcserve gateway`` processes, alice's engine-simulator deployment and her API key; and
the cleanup that leaves the shared cluster as it was (processes stopped, replica jobs cancelled, drained nodes
resumed, slurmctld running, the database dropped). See soak.py for how to run the soak."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
NAME = "soak-llm"
LEASE = "serving-controller"
PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
STOP_S = 35.0  # a gateway gives requests in flight 30 s after SIGTERM


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    """Poll ``check`` until it is true (True) or ``timeout`` seconds pass (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(interval)
    return check()


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = STOP_S) -> None:
    """SIGTERM ``proc`` if it runs, SIGKILL it if it outlives ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(argv: list[str], timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kw)


@dataclass(frozen=True)
class Settings:
    """What the deployment and the services are made with."""

    time_limit_s: int = 240
    renew_before_s: float = 90.0
    replicas: int = 2
    decode_ms_per_token: float = 10.0
    max_num_seqs: int = 64
    controller_interval_s: float = 1.0


@dataclass
class ServiceSlot:
    """One of the two services: its site file (own socket and TCP port) and its current process."""

    site: Path
    socket: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0


@dataclass
class Rig:
    """Everything the soak started; ``close`` undoes it all, whatever state it is in."""

    root: Path
    settings: Settings
    db_url: str = ""
    db_name: str = ""
    services: list[ServiceSlot] = field(default_factory=list)
    gateways: list[subprocess.Popen[bytes] | None] = field(default_factory=list)
    gateway_ports: list[int] = field(default_factory=list)
    gateway_starts: list[int] = field(default_factory=list)
    key: str = ""
    drained: set[str] = field(default_factory=set)
    jobs_seen: set[str] = field(default_factory=set)
    _store: Any = None

    # ------------------------------------------------------------------ environment
    def env(self, slot: int = 0) -> dict[str, str]:
        """The service account's environment (the database included): services and gateways run with it."""
        env = dict(os.environ)
        env.setdefault("SLURM_CONF", "/tmp/hpcserve-mc/etc/slurm.conf")
        return env | {"HPCSERVE_SITE": str(self.services[slot].site), "HPCSERVE_DATABASE_URL": self.db_url,
                      "HPCSERVE_POLICY": str(REPO / "policies" / "default.yaml"),
                      "HPCSERVE_SOCKET": str(self.services[slot].socket)}  # fmt: skip

    def user_env(self) -> dict[str, str]:
        """What alice's shell has: the cluster, the site and the first service's socket, not the database."""
        return {k: v for k, v in self.env(0).items() if not k.startswith("HPCSERVE_DATABASE")}

    def store(self) -> Any:
        from hpcserve.store import HistoryStore

        if self._store is None:
            self._store = HistoryStore(self.db_url)
        return self._store

    # ------------------------------------------------------------------ database
    def create_database(self) -> None:
        from sqlalchemy import create_engine

        self.db_name = f"hpcserve_soak_{uuid.uuid4().hex[:10]}"
        admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{self.db_name}"')
        admin.dispose()
        self.db_url = f"{PG_SERVER}/{self.db_name}"

    def drop_database(self) -> None:
        from sqlalchemy import create_engine

        if self._store is not None:
            self._store.close()
            self._store = None
        if not self.db_name:
            return
        admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        admin.dispose()

    # ------------------------------------------------------------------ services
    def write_sites(self) -> None:
        """Two site files: site_configs/minicluster.yaml with this database, a socket and port each, the
        controller ticking every ``controller_interval_s`` and the handover ``renew_before_s`` early."""
        base = yaml.safe_load((REPO / "site_configs" / "minicluster.yaml").read_text())
        base["admins"] = ["root", "@hpcadmin"]
        base["database"] = {"url": self.db_url}
        base["serving"] |= {"replica_dir": str(self.root / "replicas"), "ready_timeout_s": 60,
                            "controller_interval_s": self.settings.controller_interval_s,
                            "renew_before_s": self.settings.renew_before_s}  # fmt: skip
        for n in range(2):
            port, sock = free_port(), self.root / f"api{n}.sock"
            site = base | {"service": {"socket": str(sock), "listen": f"127.0.0.1:{port}",
                                       "url": f"http://127.0.0.1:{port}"}}  # fmt: skip
            path = self.root / f"site{n}.yaml"
            path.write_text(yaml.safe_dump(site))
            path.chmod(0o644)
            self.services.append(ServiceSlot(path, sock))

    def start_service(self, slot: int) -> subprocess.Popen[bytes]:
        """``hpcserve service`` as root (sampler every 30 s, no rebalancer: it would move shared nodes)."""
        svc = self.services[slot]
        svc.starts += 1
        argv = [sys.executable, "-m", "hpcserve", "service", "--metrics-port", "0",
                "--rebalance-interval", "0"]  # fmt: skip
        with (self.root / f"service{slot}-{svc.starts}.log").open("wb") as out:
            svc.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env(slot))
        return svc.proc

    def wait_service(self, slot: int, timeout: float = 60) -> bool:
        def answers() -> bool:
            with socket.socket(socket.AF_UNIX) as sock:
                try:
                    sock.connect(str(self.services[slot].socket))
                except OSError:
                    return False
            return True

        return wait_for(answers, timeout)

    def holder_pid(self) -> int | None:
        """The pid in the serving controller's lease (``host:pid``), or None."""
        try:
            holder = self.store().lock_holder(LEASE)
        except Exception:  # the database is busy or the lease table not made yet: ask again later
            return None
        match = re.search(r":(\d+)$", holder or "")
        return int(match[1]) if match else None

    def active_slot(self) -> int | None:
        pid = self.holder_pid()
        for n, svc in enumerate(self.services):
            if svc.proc is not None and svc.proc.poll() is None and svc.proc.pid == pid:
                return n
        return None

    # ------------------------------------------------------------------ gateways
    def start_gateway(self, n: int) -> None:
        while len(self.gateways) <= n:
            self.gateways.append(None)
            self.gateway_ports.append(free_port())
            self.gateway_starts.append(0)
        self.gateway_starts[n] += 1
        argv = [sys.executable, "-m", "hpcserve", "gateway", "--host", "127.0.0.1",
                "--port", str(self.gateway_ports[n]), "--metrics-listen", "off"]  # fmt: skip
        with (self.root / f"gateway{n}-{self.gateway_starts[n]}.log").open("wb") as out:
            self.gateways[n] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env(0))

    def gateway_listens(self, n: int) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.gateway_ports[n])) == 0

    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.gateway_ports]

    # ------------------------------------------------------------------ alice's deployment
    def as_alice(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = ["runuser", "-u", "alice", "--", sys.executable, "-m", "hpcserve", *args]
        return run(argv, timeout=120, env=self.user_env(), cwd="/")

    def deploy(self) -> None:
        """alice serves the simulator through the service (``hpcserve serve -f``) and makes a key."""
        s = self.settings
        spec = {"name": NAME, "model": "sim-model", "engine": "simulator", "gpus_per_replica": 1,
                "min_replicas": s.replicas, "max_replicas": s.replicas,
                "time_limit": f"00:{s.time_limit_s // 60:02d}:{s.time_limit_s % 60:02d}",
                "simulator": {"decode_ms_per_token": s.decode_ms_per_token,
                              "max_num_seqs": s.max_num_seqs}}  # fmt: skip
        path = self.root / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        path.chmod(0o644)
        made = self.as_alice("serve", "-f", str(path), "--no-wait", "--json")
        if made.returncode != 0:
            raise RuntimeError(f"hpcserve serve as alice failed: {made.stderr.strip()[-400:]}")
        key = self.as_alice("keys", "create", "--name", "soak", "--json")
        if key.returncode != 0:
            raise RuntimeError(f"hpcserve keys create as alice failed: {key.stderr.strip()[-400:]}")
        self.key = json.loads(key.stdout)["key"]

    def replicas(self) -> list[Any]:
        """The deployment's replicas as the database holds them (empty when it cannot be read now)."""
        try:
            found = list(self.store().replicas(NAME))
        except Exception:  # a busy database: the caller asks again
            return []
        self.jobs_seen.update(str(r.job_id) for r in found if r.job_id)
        return found

    def ready(self) -> list[Any]:
        return [r for r in self.replicas() if r.state == "ready" and r.job_id]

    # ------------------------------------------------------------------ teardown
    def close(self, keep_logs: bool) -> list[str]:
        """Stop everything the soak started and leave the cluster usable; what it did, one line each."""
        done: list[str] = []
        for proc in self.gateways:
            stop(proc, timeout=10)
        for svc in self.services:
            stop(svc.proc, timeout=20)
        done.append("gateways and services stopped")
        done += ensure_slurmctld()
        for node in sorted(self.drained):
            run(["scontrol", "update", f"nodename={node}", "state=resume"])
            done.append(f"{node} resumed")
        done += self._cancel_jobs()
        try:
            self.drop_database()
            done.append(f"database {self.db_name} dropped")
        except Exception as exc:  # report it; the rest of the cleanup still ran
            done.append(f"database {self.db_name} NOT dropped: {exc!r}")
        if keep_logs:
            done.append(f"logs kept in {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)
        return done

    def _cancel_jobs(self) -> list[str]:
        self.replicas()
        out = run(["squeue", "-h", "-o", "%i %k"]).stdout
        ids = {line.split()[0] for line in out.splitlines() if f"replica:{NAME}:" in line}
        ids |= {j for j in self.jobs_seen if j in out.split()}
        if ids:
            run(["scancel", *sorted(ids)])
            return [f"replica jobs cancelled: {' '.join(sorted(ids))}"]
        return []


def make_rig(settings: Settings) -> Rig:
    root = Path(tempfile.mkdtemp(prefix="hps-soak-", dir="/tmp"))
    root.chmod(0o755)
    return Rig(root, settings)


def slurmctld_answers() -> bool:
    return run(["scontrol", "ping"], timeout=10).stdout.count("UP") > 0


def slurmctld_pidfile() -> Path:
    out = run(["scontrol", "show", "config"]).stdout
    match = re.search(r"^SlurmctldPidFile\s*=\s*(\S+)", out, re.MULTILINE)
    conf = os.environ.get("SLURM_CONF", "/tmp/hpcserve-mc/etc/slurm.conf")
    return Path(match[1]) if match else Path(conf).parent.parent / "run" / "slurmctld.pid"


def start_slurmctld(pidfile: Path) -> bool:
    """Start slurmctld as scripts/minicluster.sh does, and record its pid where the script keeps the pids it
    owns (so ``minicluster.sh stop`` still stops it); whether it answers within 30 s."""
    conf = os.environ.get("SLURM_CONF", "/tmp/hpcserve-mc/etc/slurm.conf")
    run(["slurmctld", "-f", conf])
    up = wait_for(slurmctld_answers, 30, 0.2)
    owned = pidfile.parent / "owned"
    if up and owned.is_dir() and pidfile.exists():
        shutil.copyfile(pidfile, owned / "slurmctld.pid")
    return up


def ensure_slurmctld() -> list[str]:
    """slurmctld running at the end, whatever a fault left."""
    if slurmctld_answers():
        return []
    up = start_slurmctld(slurmctld_pidfile())
    return [f"slurmctld was down: started again ({'answers' if up else 'NOT answering'})"]
