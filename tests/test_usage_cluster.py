"""``hpcserve usage`` on the local cluster: real jobs of alice and bob (each charged to their own slurmdbd
account) with known GPUs and durations, read through a real ``hpcserve service`` (root, its own database)
by the real users (runuser), and checked against a direct ``sacct`` read: every finished run's GPU-seconds,
to the second, and the sums; each user sees only their own; the cost follows the site's price per type.
Tokens: a known request set through a real gateway to engine simulators (test_gateway_tenancy's rig) must
match the gateway's own counters (its /metrics) and the answers' usage."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.api_fixtures import ApiService, short_root  # noqa: F401 (fixture)
from tests.conftest import wait_until
from tests.test_gateway_tenancy import Rig, _chat, rig  # noqa: F401 (fixture)

pytestmark = pytest.mark.cluster
PRICES = {"default": 1.75, "h100": 3.2, "l40s": 1.1}
NODE_TYPE = {**{f"node{i}": "h100" for i in range(1, 5)}, **{f"node{i}": "l40s" for i in range(5, 9)}}
# user, partition, GPUs, seconds of sleep
EDGE_S = 16  # alice's job that the second window opens in the middle of
JOBS = (("alice", "train", 2, 3), ("alice", "infer", 1, 5), ("bob", "infer", 3, 4), ("bob", "train", 1, 2),
        ("alice", "train", 1, EDGE_S))  # fmt: skip


def sbatch_as(user: str, partition: str, gpus: int, sleep_s: int) -> str:
    argv = ["runuser", "-u", user, "--", "sbatch", "--parsable", "-p", partition, "-t", "2",
            "-o", "/dev/null", "--chdir=/tmp", f"--gres=gpu:{gpus}", "--job-name=usage-test",
            "--wrap", f"sleep {sleep_s}"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip().split(";")[0]


def sacct(*args: str) -> list[dict[str, str]]:
    """A direct sacct read (-X -D, parsable2), independent of hpcserve's parser."""
    fields = ("JobIDRaw", "User", "Account", "State", "AllocTRES", "ElapsedRaw", "Start", "End", "NodeList")
    argv = ["sacct", "-n", "-X", "-D", "-P", "--noconvert", f"--format={','.join(fields)}", *args]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    return [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines() if line]


def gpus_of(tres: str) -> int:
    match = re.search(r"(?:^|,)gres/gpu=(\d+)", tres)
    return int(match.group(1)) if match else 0


def finished(row: dict[str, str]) -> bool:
    return row["End"] not in ("Unknown", "") and row["State"].split()[0] not in ("RUNNING", "PENDING")


@pytest.fixture
def priced(short_root: Path, slurm_env: dict[str, str]) -> Iterator[ApiService]:  # noqa: F811
    """The service, with the site's prices set to PRICES."""
    service = ApiService(short_root, slurm_env, f"sqlite:///{short_root}/state/hpcserve.db")
    data = yaml.safe_load(service.site.read_text())
    data["cost"] = {"currency": "EUR", "gpu_hour_price": PRICES}
    service.site.write_text(yaml.safe_dump(data))
    service.start("--sample-interval", "0", "--rebalance-interval", "0")
    try:
        service.wait_ready()
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def ran(slurm_env: dict[str, str]) -> Iterator[tuple[float, dict[str, tuple[str, int, int]]]]:
    """JOBS submitted as their users and finished, as slurmdbd recorded them: (t0, id -> (user, GPUs,
    sleep))."""
    t0 = time.time()
    ids = {sbatch_as(user, part, gpus, sleep_s): (user, gpus, sleep_s) for user, part, gpus, sleep_s in JOBS}
    try:

        def recorded() -> bool:
            rows = sacct(f"--jobs={','.join(ids)}")
            return {r["JobIDRaw"] for r in rows if finished(r) and r["State"] == "COMPLETED"} == set(ids)

        wait_until(recorded, timeout=150, interval=1.0)  # slurmdbd records an end a moment after it
        yield t0, ids
    finally:
        subprocess.run(["scancel", *ids], capture_output=True, check=False)


def record_telemetry(
    service: ApiService, job_id: str, row: dict[str, str], util_pct: tuple[float, ...]
) -> None:
    """Readings of the job's GPUs in the service's store, as the telemetry API would have stored them."""
    from hpcserve.model.telemetry import GpuSample

    at = datetime.fromisoformat(row["Start"]).astimezone(UTC)
    samples = [GpuSample(at, job_id, f"GPU-{i}", i, pct, 1, 2, None, None) for i, pct in enumerate(util_pct)]
    with service.store() as store:
        store.add_gpu_samples(samples, user=row["User"], kind="training")


def usage_as(service: ApiService, user: str, *args: str) -> dict[str, Any]:
    done = service.run_as(user, "usage", "--json", "--jobs", *args)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def sacct_window(report: dict[str, Any], *who: str) -> list[dict[str, str]]:
    local = [datetime.fromisoformat(report[k]).astimezone().strftime("%Y-%m-%dT%H:%M:%S")
             for k in ("since", "until")]  # fmt: skip
    return sacct(f"--starttime={local[0]}", f"--endtime={local[1]}", *who)


def check_against_sacct(report: dict[str, Any], rows: list[dict[str, str]]) -> int:
    """Every run that had finished before the report's window closed: the same GPU-seconds as sacct's
    gres/gpu x ElapsedRaw, to the second; a run that began before the window, only its seconds inside it
    (runs still going change between two reads: left out)."""
    since = datetime.fromisoformat(report["since"])
    until = datetime.fromisoformat(report["until"])
    expected: dict[str, int] = defaultdict(int)
    for row in rows:
        if row["Start"] == "Unknown" or not finished(row):
            continue
        start = datetime.fromisoformat(row["Start"]).astimezone(UTC)
        before = max(0, round((since - start).total_seconds()))
        seconds = int(row["ElapsedRaw"] or 0) - before
        ended = datetime.fromisoformat(row["End"]).astimezone(UTC) <= until
        if ended and seconds > 0 and gpus_of(row["AllocTRES"]):
            expected[row["JobIDRaw"]] += gpus_of(row["AllocTRES"]) * seconds
    got: dict[str, int] = defaultdict(int)
    for job in report["jobs"]:
        if job["job_id"] in expected:
            got[job["job_id"]] += job["gpu_seconds"]
    assert got == expected
    assert report["total"]["gpu_seconds"] == sum(j["gpu_seconds"] for j in report["jobs"])
    return sum(expected.values())


def test_a_job_overlapping_the_window_counts_its_time_inside(
    ran: tuple[float, dict[str, tuple[str, int, int]]], priced: ApiService
) -> None:
    _, ids = ran
    edge = next(i for i, (_, _, sleep_s) in ids.items() if sleep_s == EDGE_S)
    row = sacct(f"--jobs={edge}")[0]
    start = datetime.fromisoformat(row["Start"]).astimezone(UTC)
    since_s = int((datetime.now(UTC) - start).total_seconds()) - EDGE_S // 2  # the window opens mid-job
    report = usage_as(priced, "alice", "--since", f"{since_s}s")
    inside = [j["gpu_seconds"] for j in report["jobs"] if j["job_id"] == edge]
    full = int(row["ElapsedRaw"])
    assert inside and 0 < inside[0] < full, (inside, full, report["since"], row)
    assert inside[0] == full - round((datetime.fromisoformat(report["since"]) - start).total_seconds())
    check_against_sacct(report, sacct_window(report, "--user=alice"))


def test_usage_matches_sacct_and_each_user_sees_their_own(
    ran: tuple[float, dict[str, tuple[str, int, int]]], priced: ApiService
) -> None:
    t0, ids = ran
    since = f"{int(time.time() - t0) + 120}s"
    direct = {r["JobIDRaw"]: r for r in sacct(f"--jobs={','.join(ids)}")}
    for job_id, (user, gpus, sleep_s) in ids.items():  # known GPUs and durations, as sacct has them
        assert gpus_of(direct[job_id]["AllocTRES"]) == gpus and direct[job_id]["User"] == user
        assert (
            direct[job_id]["Account"] == f"acct-{user}"
            and sleep_s <= int(direct[job_id]["ElapsedRaw"]) <= sleep_s + 3
        )

    sampled = next(i for i, (user, gpus, _) in ids.items() if (user, gpus) == ("alice", 2))
    record_telemetry(priced, sampled, direct[sampled], util_pct=(30.0, 50.0))  # a 40% mean
    reports = {user: usage_as(priced, user, "--since", since) for user in ("alice", "bob", "carol")}
    (telemetered,) = [j for j in reports["alice"]["jobs"] if j["job_id"] == sampled]
    assert telemetered["busy_gpu_seconds"] == pytest.approx(0.4 * telemetered["gpu_seconds"])
    assert all(j["busy_gpu_seconds"] is None for j in reports["alice"]["jobs"] if j["job_id"] != sampled)
    alice_total = reports["alice"]["total"]
    assert alice_total["busy_gpu_hours"] == pytest.approx(0.4 * telemetered["gpu_seconds"] / 3600, abs=2e-6)
    assert alice_total["idle_gpu_hours"] == pytest.approx(0.6 * telemetered["gpu_seconds"] / 3600, abs=2e-6)
    for user in ("alice", "bob"):
        report = reports[user]
        assert report["scope"] == user and report["currency"] == "EUR"
        assert {j["user"] for j in report["jobs"]} <= {user} and [g["group"] for g in report["groups"]] == [
            user
        ]
        mine = {i for i, (owner, _, _) in ids.items() if owner == user}
        assert mine <= {j["job_id"] for j in report["jobs"]}
        assert not {i for i in ids if i not in mine} & {
            j["job_id"] for j in report["jobs"]
        }  # never the other's
        checked = check_against_sacct(report, sacct_window(report, f"--user={user}"))
        assert checked >= sum(
            gpus * int(direct[i]["ElapsedRaw"]) for i, (_, gpus, _) in ids.items() if i in mine
        )
        for job in report["jobs"]:  # the cost follows the price of the type of the job's nodes
            if job["job_id"] in ids:
                kind = NODE_TYPE[direct[job["job_id"]]["NodeList"]]
                assert job["cost"] == pytest.approx(job["gpu_seconds"] / 3600 * PRICES[kind], abs=2e-6)
        assert report["total"]["cost"] == pytest.approx(sum(j["cost"] for j in report["jobs"]), abs=1e-5)

    everyone = reports["carol"]
    assert everyone["scope"] == "everyone" and set(ids) <= {j["job_id"] for j in everyone["jobs"]}
    check_against_sacct(everyone, sacct_window(everyone, "--allusers"))

    bob_accounts = usage_as(priced, "bob", "--since", since, "--by", "account")
    assert [g["group"] for g in bob_accounts["groups"]] == ["acct-bob"]
    table = priced.run_as("carol", "usage", "--since", since, "--csv", "--by", "user")
    assert table.returncode == 0, table.stderr
    lines = list(csv.DictReader(io.StringIO(table.stdout)))
    by_user = {row["group"]: row for row in lines}
    assert {"alice", "bob", "TOTAL"} <= set(by_user) and float(by_user["alice"]["cost"]) > 0


def test_bad_usage_input_is_one_line(priced: ApiService) -> None:
    for args, text in ((("--since", "3x"), "not a duration"), (("--json", "--csv"), "choose one"),
                       (("--by", "team"), "team")):  # fmt: skip
        done = priced.run_as("alice", "usage", *args)
        assert done.returncode == 2 and text in done.stderr and "Traceback" not in done.stderr


def _metric(text: str, name: str, key_id: str) -> int:
    total = 0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'key="{key_id}"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def await_report(read: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
    """The report once ``read`` gives one (the gateway flushes its counters to the store every ~10 s)."""
    found: list[dict[str, Any] | None] = [None]

    def flushed() -> bool:
        found[0] = read()
        return found[0] is not None

    wait_until(flushed, timeout=40, interval=1.0)
    return found[0]


def test_tokens_match_the_gateways_counters(rig: Rig) -> None:  # noqa: F811
    alice, bob = rig.make_key("alice"), rig.make_key("bob")
    answers: dict[str, list[dict[str, int]]] = {alice["id"]: [], bob["id"]: []}

    def ask(key: dict[str, Any], model: str, **extra: Any) -> bool:
        answer = rig.post(key["key"], _chat(model, **extra))
        if answer.status_code == 200:
            answers[key["id"]].append(answer.json()["usage"])
        return answer.status_code == 200

    wait_until(lambda: ask(alice, "alice-llm", max_tokens=3), timeout=30)  # keys reach the gateway
    wait_until(lambda: ask(bob, "bob-llm", max_tokens=2), timeout=30)
    for max_tokens in (5, 9, 17):
        assert ask(alice, "alice-llm", max_tokens=max_tokens)
    assert ask(bob, "bob-llm", max_tokens=11)

    def reported(user: str, key: dict[str, Any]) -> dict[str, Any] | None:
        report = usage_as(rig.service, user, "--since", "1d", "--by", "key")
        rows = {g["group"]: g for g in report["groups"]}
        row = rows.get(key["id"])
        return report if row and row["requests"] == len(answers[key["id"]]) else None

    metrics = httpx.get(rig.admin + "/metrics", timeout=5).text
    for user, key in (("alice", alice), ("bob", bob)):
        report = await_report(lambda u=user, k=key: reported(u, k))  # type: ignore[misc]
        assert report is not None and [g["group"] for g in report["groups"]] == [key["id"]]  # only theirs
        row = report["groups"][0]
        sent = answers[key["id"]]
        assert row["prompt_tokens"] == sum(a["prompt_tokens"] for a in sent)
        assert row["completion_tokens"] == sum(a["completion_tokens"] for a in sent)
        assert row["prompt_tokens"] == _metric(metrics, "hpcserve_gateway_prompt_tokens_total", key["id"])
        assert row["completion_tokens"] == _metric(
            metrics, "hpcserve_gateway_completion_tokens_total", key["id"]
        )
    deployments = usage_as(rig.service, "bob", "--since", "1d", "--by", "deployment")
    served = {g["group"]: g["tokens"] for g in deployments["groups"] if g["group"]}  # "": his plain jobs
    assert served == {"bob-llm": sum(a["prompt_tokens"] + a["completion_tokens"] for a in answers[bob["id"]])}
