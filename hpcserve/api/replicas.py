"""Replicas announcing themselves: what an announcement must prove before the service believes it.

A replica job (run by the deployment's owner) says where its engine serves, ``host:port``. The service
believes it only when:
- it carries the secret the service issued for exactly that replica at submit (only its sha256 is stored;
  compared in constant time), so a forged or stale announcement changes nothing (401);
- it names the job id the service recorded for that replica (403), so another job cannot speak for it;
- on the Unix socket, the kernel says the caller is the deployment's owner (403). Over TCP the secret is the
  proof: no munge credential is needed from inside a job.

The announcement is recorded on the replica (``url``, ``host``, ``port``, and ``ready_at`` = when it was
announced); the serving controller checks it against the replica's live job and marks it ready. A replica
with sleep mode announces its agent's port (hpcserve.serving.agent) and ``models``: ``{served model name:
engine port}``, one entry per engine of the job (a pool's members); others send none (stored as null).

The start's phases (``hpcserve.serving.phases``) get their queue wait here: from the submit the service
recorded to the job's process start on its node (two clocks, to the millisecond), checked against Slurm's
own (the job's submit to its start as slurmctld records both: one clock, whole seconds) when the
service's last squeue (at most ``QUEUE_VIEW_AGE_S`` old, never a read of its own) shows the job running.
Where the two differ by more than Slurm's rounding, the clocks disagree and Slurm's figure is kept.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hpcserve.api.errors import Forbidden, Unauthenticated
from hpcserve.errors import ValidationError
from hpcserve.serving.phases import StartPhases
from hpcserve.serving.tags import secret_hash

if TYPE_CHECKING:
    from hpcserve.api.caller import Caller
    from hpcserve.api.context import ApiContext
    from hpcserve.model.cluster import Job
    from hpcserve.store import Replica

ANNOUNCEABLE = ("starting", "ready")  # a requeued ready replica announces again
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")  # a host name or an IPv4 address, nothing else
_JOB_ID = re.compile(r"^[0-9]+(_[0-9]+)?$")
MAX_MODELS = 64  # engines one replica job may announce (a pool's members)
MAX_MODEL_NAME = 256
QUEUE_VIEW_AGE_S = 60.0  # the service's squeue read this recently holds the job's submit and start
CLOCKS_S = 1.5  # Slurm's queue wait (whole seconds) and the two clocks' agree within this when clocks agree


@dataclass(frozen=True, slots=True)
class Announce:
    """``POST /v1/replicas/announce``'s body."""

    deployment: str
    index: int
    job_id: str
    host: str
    port: int
    models: dict[str, int] | None = None  # a sleep-mode replica: {served model name: engine port}
    phases: StartPhases | None = None  # how its start went (hpcserve.serving.phases)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def parse_announce(body: dict[str, Any]) -> Announce:
    """The body's fields, checked; a one-line ValidationError (400) naming the field otherwise."""
    deployment, index, job_id = body.get("deployment"), body.get("index"), body.get("job_id")
    host, port = body.get("host"), body.get("port")
    if not isinstance(deployment, str) or not deployment:
        raise ValidationError("deployment: expected the deployment's name")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValidationError(f"index: expected a replica index (0 or more), got {index!r}")
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise ValidationError(f"job_id: expected a Slurm job id, got {job_id!r}")
    if not isinstance(host, str) or not _HOST.match(host):
        raise ValidationError(f"host: expected a host name, got {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValidationError(f"port: expected 1 to 65535, got {port!r}")
    phases = body.get("phases")
    return Announce(deployment, index, job_id, host, port, parse_models(body.get("models")),
                    None if phases is None else StartPhases.from_json(phases))  # fmt: skip


def parse_models(models: object) -> dict[str, int] | None:
    """The optional ``models`` of a sleep-mode replica (its port is then the replica agent's):
    ``{served model name: engine port}``, 1 to ``MAX_MODELS`` entries, names one word."""
    if models is None:
        return None
    if not isinstance(models, dict) or not 0 < len(models) <= MAX_MODELS:
        raise ValidationError(f"models: expected {{served model name: engine port}} with 1 to {MAX_MODELS} "
                              f"entries, got {str(models)[:80]!r}")  # fmt: skip
    for name, port in models.items():
        if not isinstance(name, str) or not _one_word(name):
            raise ValidationError(f"models: {str(name)[:80]!r} is no served model name (fix: one word)")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValidationError(f"models.{name}: expected a port from 1 to 65535, got {port!r}")
    return dict(models)


def _one_word(name: str) -> bool:
    return 0 < len(name) <= MAX_MODEL_NAME and not any(c.isspace() or ord(c) < 32 for c in name)


def check_announce(
    note: Announce, secret: str, caller: Caller | None, owner: str | None, replica: Replica | None
) -> None:
    """Whether the announcement is the replica's own (pure): raises ``Unauthenticated`` or ``Forbidden``."""
    who = f"replica {note.deployment}:{note.index}"
    if caller is not None and owner is not None and caller.user != owner:
        raise Forbidden(f"{who}: only its owner's job may announce it, not {caller.user}")
    if owner is None or replica is None or not secret_matches(secret, replica.secret_hash):
        raise Unauthenticated(f"{who}: unknown replica or wrong secret")
    if replica.job_id != note.job_id:
        raise Forbidden(f"{who}: job {note.job_id} is not the replica's job")
    if replica.state not in ANNOUNCEABLE:
        raise Forbidden(f"{who}: is {replica.state}, not starting")


def secret_matches(secret: str, stored: str | None) -> bool:
    """Whether ``secret`` hashes to ``stored``, compared in constant time; never for a replica without one."""
    return bool(stored) and hmac.compare_digest(secret_hash(secret), str(stored))


def announce(api: ApiContext, note: Announce, secret: str, caller: Caller | None) -> Replica:
    """Record the announcement once ``check_announce`` passes; the replica as stored."""
    from hpcserve.api.job_owners import running_in_view

    deployment = api.store.get_deployment(note.deployment)
    replica = None
    if deployment is not None:
        replica = next((r for r in api.store.replicas(note.deployment) if r.index == note.index), None)
    check_announce(note, secret, caller, deployment.owner if deployment else None, replica)
    job = running_in_view(api.slurm, note.job_id, QUEUE_VIEW_AGE_S) if note.phases is not None else None
    return api.store.upsert_replica(note.deployment, note.index, url=note.url, host=note.host,
                                    port=note.port, ready_at=api.clock(), models=note.models,
                                    phases=_phases(note, replica, job))  # fmt: skip


def _phases(note: Announce, replica: Replica | None, job: Job | None) -> dict[str, Any] | None:
    """The announced phases with the queue wait: from the submit the service recorded (``started_at``) to
    the job's process start, unless Slurm's own (``job``: the service's view of the running job) says the
    two clocks disagree: Slurm records whole seconds, so its figure is off by up to 1 s."""
    if note.phases is None:
        return None
    submitted = replica.started_at if replica is not None else None
    phases = note.phases if submitted is None else note.phases.with_queue_wait(submitted.timestamp())
    slurms = job.wait_s if job is not None else None  # the job id is the replica's (check_announce)
    if slurms is not None and (phases.queue_wait_s is None or abs(phases.queue_wait_s - slurms) > CLOCKS_S):
        phases = note.phases.with_queue_wait_s(slurms)
    return phases.as_json()
