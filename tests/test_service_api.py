"""The service's API transports, from the callers' side: the Unix socket names each real user by the
kernel's SO_PEERCRED; over TCP only a munge credential made for exactly that request is taken, and a
forged, replayed, expired or re-targeted one gets 401."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from hpcserve.service import munge
from tests.api_fixtures import ApiService

pytestmark = pytest.mark.cluster


def whoami_as(service: ApiService, user: str) -> dict[str, object]:
    code = ("import json; from hpcserve.service.client import ServiceClient as C; "
            f"print(json.dumps(C({str(service.socket)!r}).call('GET', '/v1/whoami')))")  # fmt: skip
    argv = ["runuser", "-u", user, "--", sys.executable, "-c", code]
    env = service.user_env()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False, cwd="/")
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_the_socket_names_each_user_by_the_kernel(api_service: ApiService) -> None:
    alice, bob, carol = (whoami_as(api_service, u) for u in ("alice", "bob", "carol"))
    assert (alice["user"], alice["admin"]) == ("alice", False)
    assert (bob["user"], bob["admin"]) == ("bob", False)
    assert carol["user"] == "carol" and carol["admin"] is True  # admins: ["@hpcadmin"]
    assert "hpcadmin" in carol["groups"]  # type: ignore[operator]
    # what bob says about himself does not matter: USER and LOGNAME are his to set
    forged = api_service.run_as("bob", "--help", env={"USER": "alice", "LOGNAME": "alice"})
    assert forged.returncode == 0


def tcp_get(service: ApiService, path: str, credential: str | None) -> httpx.Response:
    headers = {"Authorization": f"Munge {credential}"} if credential else {}
    return httpx.get(f"http://127.0.0.1:{service.port}{path}", headers=headers, timeout=30)


def credential_as(user: str, payload: bytes, ttl: int = 0) -> str:
    argv = ["runuser", "-u", user, "--", "munge", "--input=-"] + (["--ttl", str(ttl)] if ttl else [])
    return (
        subprocess.run(argv, input=payload, capture_output=True, check=True, timeout=30)
        .stdout.decode()
        .strip()
    )


def test_tcp_takes_a_munge_credential_for_exactly_this_request(api_service: ApiService) -> None:
    good = credential_as("bob", munge.request_payload("GET", "/v1/whoami", b""))
    answer = tcp_get(api_service, "/v1/whoami", good)
    assert answer.status_code == 200 and answer.json()["user"] == "bob"
    replayed = tcp_get(api_service, "/v1/whoami", good)
    assert replayed.status_code == 401 and "Replayed" in replayed.json()["error"]
    assert tcp_get(api_service, "/v1/whoami", None).status_code == 401
    forged = tcp_get(api_service, "/v1/whoami", "MUNGE:AwQFAAB" + "A" * 100 + ":")
    assert forged.status_code == 401
    other = credential_as("bob", munge.request_payload("GET", "/v1/deployments", b""))
    retargeted = tcp_get(api_service, "/v1/whoami", other)
    assert retargeted.status_code == 401 and "another request" in retargeted.json()["error"]


def test_tcp_refuses_an_expired_credential(api_service: ApiService) -> None:
    import time

    old = credential_as("alice", munge.request_payload("GET", "/v1/whoami", b""), ttl=1)
    time.sleep(2.5)
    answer = tcp_get(api_service, "/v1/whoami", old)
    assert answer.status_code == 401 and "Expired" in answer.json()["error"]


def test_the_cli_says_in_one_line_when_the_service_is_down(
    short_root: Path, slurm_env: dict[str, str]
) -> None:
    service = ApiService(short_root, slurm_env, f"sqlite:///{short_root}/db.sqlite")
    done = service.run_as("alice", "deployments")
    assert done.returncode == 69
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the hpcserve service" in lines[0] and "fix:" in lines[0]


def test_doctor_as_a_user_finds_the_service_and_leaves_its_database_alone(api_service: ApiService) -> None:
    done = api_service.run_as("alice", "doctor", "--json")
    checks = {c["check"]: c for c in json.loads(done.stdout)}
    assert checks["service"]["ok"] and "you are alice (not an admin)" in checks["service"]["detail"]
    assert checks["database"]["ok"] and "the service's alone" in checks["database"]["detail"]
