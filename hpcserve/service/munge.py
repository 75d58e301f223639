"""Munge credentials for the API over TCP: who sent a request from another login node.

A credential's payload binds the request: ``METHOD PATH sha256(body)``. The service decodes it with
``unmunge`` (munged checks the MAC, the TTL and replays), takes the uid munged vouches for, and refuses a
credential whose payload names another request, so one captured on the wire cannot be spent elsewhere.
"""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass

from hpcserve.errors import HpcserveError

SCHEME = "Munge "
TIMEOUT_S = 5.0


class MungeError(HpcserveError):
    """A credential munged would not vouch for (forged, replayed, expired) or one for another request."""


@dataclass(frozen=True, slots=True)
class Decoded:
    uid: int
    gid: int
    payload: bytes


def request_payload(method: str, path: str, body: bytes) -> bytes:
    """What a credential for this request carries: the method, the path (with its query) and the body's
    hash."""
    return f"{method.upper()} {path} {hashlib.sha256(body).hexdigest()}".encode()


def encode(payload: bytes, ttl_s: int = 0) -> str:
    """A credential for the calling process's uid carrying ``payload`` (``munge``; 0: munged's TTL)."""
    argv = ["munge", "--input=-", "--output=-"] + (["--ttl", str(ttl_s)] if ttl_s else [])
    return _run(argv, payload).stdout.decode().strip()


def decode(credential: str) -> Decoded:
    """The uid, gid and payload munged vouches for; ``MungeError`` with munged's reason otherwise."""
    done = _run(["unmunge", "--input=-", "--output=-"], credential.encode(), check=False)
    head, _, payload = done.stdout.partition(b"\n\n")
    fields = dict(_field(line) for line in head.decode(errors="replace").splitlines() if ":" in line)
    status = fields.get("STATUS") or _last_line(done.stderr)  # e.g. "Success (0)", "Replayed credential (17)"
    if not status.startswith("Success"):
        raise MungeError(f"munge credential refused: {status}")
    try:
        return Decoded(_number(fields["UID"]), _number(fields["GID"]), payload)
    except (KeyError, ValueError):
        raise MungeError("munge credential refused: no uid in unmunge's answer") from None


def _number(value: str) -> int:
    """``"alice (1001)"`` -> 1001."""
    return int(value.rpartition("(")[2].rstrip(")"))


def check_request(credential: str, method: str, path: str, body: bytes) -> int:
    """The uid of a credential made for exactly this request; ``MungeError`` otherwise."""
    decoded = decode(credential)
    if decoded.payload != request_payload(method, path, body):
        raise MungeError("munge credential refused: it was made for another request")
    return decoded.uid


def authorization(method: str, path: str, body: bytes) -> str:
    """The Authorization header value for a request from this process."""
    return SCHEME + encode(request_payload(method, path, body))


def _field(line: str) -> tuple[str, str]:
    key, _, value = line.partition(":")
    return key.strip(), value.strip()


def _last_line(stderr: bytes) -> str:
    lines = stderr.decode(errors="replace").strip().splitlines()
    return lines[-1].removeprefix("unmunge: Error: ") if lines else "no answer from unmunge"


def _run(argv: list[str], stdin: bytes, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, timeout=TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MungeError(f"{argv[0]}: {exc} (fix: install munge and start munged)") from None
    if check and done.returncode != 0:
        raise MungeError(f"{argv[0]} failed: {_last_line(done.stderr)} (fix: is munged running?)")
    return done
