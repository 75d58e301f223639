"""hpcserve usage, pure parts: the sacct read's argv and parser, window clipping, GPU types and prices,
replica recognition (forged tags refused), served-nothing coverage, token visibility and the
sums per group."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pytest

from hpcserve.config.sections import CostSettings
from hpcserve.errors import SlurmParseError
from hpcserve.model.usage import GpuAllocation
from hpcserve.slurm.commands import USAGE_FIELDS, record_mark, sacct_usage_argv
from hpcserve.slurm.parsers import gpu_tres, parse_sacct_usage
from hpcserve.usage.compute import (
    DeploymentInfo,
    EngineMark,
    TokenRow,
    UsageInputs,
    classify,
    gpu_split,
    served_seconds,
    usage_report,
    visible_tokens,
)

NONCE = "0123456789abcdef"
M = record_mark(NONCE)
T0 = datetime(2026, 12, 7, 18, 0, tzinfo=UTC)
PRICES = CostSettings(gpu_hour_price={"default": 2.0, "h100": 3.6, "l40s": 1.2})


def _line(*fields: str) -> str:
    assert len(fields) == len(USAGE_FIELDS)
    return "".join(f + M for f in fields) + "\n"


# As sacct prints it (UTC here): a finished 2-GPU job, a running typed one, a pending one, a requeued job's
# two runs, and bob's job whose name holds a newline and a forged record with a guessed mark.
FORGED = "x\n99999\x1fffffffffffffffffalice"
SACCT = (
    _line("101", "alice", "acct-alice", "train", "COMPLETED", "node1",
          "billing=2,cpu=2,gres/gpu=2,mem=2048M,node=1", "2026-12-07T18:00:05", "2026-12-07T18:00:35", "30",
          "sleep", "")
    + _line("102", "bob", "acct-bob", "infer", "RUNNING", "node[5-6]",
            "cpu=2,gres/gpu=4,gres/gpu:l40s=4,node=2", "2026-12-07T18:01:00", "Unknown", "120", "m-r0",
            "hpcserve:replica:m:0")
    + _line("103", "alice", "acct-alice", "train", "PENDING", "None assigned", "", "Unknown", "Unknown", "0",
            "wait", "")
    + _line("104", "bob", "acct-bob", "all", "REQUEUED", "node7", "gres/gpu=1", "2026-12-07T18:00:00",
            "2026-12-07T18:00:10", "10", "r", "")
    + _line("104", "bob", "acct-bob", "all", "CANCELLED by 0", "node8", "gres/gpu=1", "2026-12-07T18:00:40",
            "2026-12-07T18:01:00", "20", "r", "")
    + _line("105", "bob", "acct-bob", "infer", "COMPLETED", "node5", "gres/gpu=1", "2026-12-07T18:00:00",
            "2026-12-07T18:00:01", "1", FORGED, "")
)  # fmt: skip


def test_the_sacct_read_is_one_argv_list() -> None:
    argv = sacct_usage_argv("2026-11-07T18:00:00", "2026-12-07T18:00:00", "alice", NONCE)
    assert argv[:6] == ["sacct", "-n", "-X", "-D", "--noconvert", "--parsable"]
    assert f"--delimiter={M}" in argv and "--user=alice" in argv and "--allusers" not in argv
    assert "--starttime=2026-11-07T18:00:00" in argv and "--endtime=2026-12-07T18:00:00" in argv
    assert sacct_usage_argv("a", "b", None, NONCE)[-1] == "--allusers"
    with pytest.raises(Exception, match="not a plain Slurm name"):
        sacct_usage_argv("a", "b", "alice,bob", NONCE)  # a caller can never widen the read


def test_parser_reads_every_run_and_keeps_hostile_names_in_their_field() -> None:
    runs = parse_sacct_usage(SACCT, NONCE)
    assert [r.job_id for r in runs] == ["101", "102", "103", "104", "104", "105"]
    first = runs[0]
    assert (first.user, first.account, first.partition, first.gpus, first.elapsed_s) == (
        "alice", "acct-alice", "train", 2, 30
    )  # fmt: skip
    assert first.start == datetime(2026, 12, 7, 18, 0, 5, tzinfo=UTC) and first.nodes == ("node1",)
    running = runs[1]
    assert running.end is None and running.gpu_types == (("l40s", 4),) and running.nodes == ("node5", "node6")
    assert running.comment == "hpcserve:replica:m:0" and running.name == "m-r0"
    assert runs[2].gpus == 0 and runs[2].start is None and runs[2].nodes == ()
    assert runs[4].state == "CANCELLED" and runs[5].name == FORGED and runs[5].user == "bob"


def test_gpu_tres_totals_and_types() -> None:
    assert gpu_tres("billing=4,gres/gpu=4,gres/gpu:a100=3,gres/gpu:l40s=1") == (4, (("a100", 3), ("l40s", 1)))
    assert gpu_tres("cpu=1,mem=1G") == (0, ())


def _run(
    job_id: str = "1", start: datetime = T0, elapsed: int = 3600, gpus: int = 2, **kw: object
) -> GpuAllocation:
    fields: dict[str, object] = {
        "user": "alice", "account": "acct-alice", "partition": "train", "state": "COMPLETED",
        "nodes": ("node1",), "gpu_types": (), "end": start + timedelta(seconds=elapsed), "name": "job",
        "comment": "",
    }  # fmt: skip
    fields.update(kw)
    return GpuAllocation(job_id=job_id, gpus=gpus, start=start, elapsed_s=elapsed, **fields)  # type: ignore[arg-type]


def test_a_run_counts_only_its_time_inside_the_window() -> None:
    run = _run(start=T0, elapsed=3600)
    assert run.seconds_within(T0 - timedelta(days=1), T0 + timedelta(days=1)) == 3600  # all of ElapsedRaw
    assert run.seconds_within(T0 + timedelta(minutes=45), T0 + timedelta(days=1)) == 900  # started before
    assert run.seconds_within(T0 - timedelta(hours=1), T0 + timedelta(minutes=10)) == 600  # runs past until
    assert run.seconds_within(T0 + timedelta(hours=2), T0 + timedelta(hours=3)) == 0
    assert _run(start=T0, elapsed=0).seconds_within(T0, T0 + timedelta(hours=1)) == 0


def test_gpu_types_from_tres_then_nodes_then_default() -> None:
    nodes = {"node1": "h100", "node2": "h100", "node5": "l40s"}
    assert gpu_split(_run(gpus=4, gpu_types=(("h100", 3),)), nodes) == [("h100", 3), ("h100", 1)]
    assert gpu_split(_run(gpus=2, nodes=("node1", "node2")), nodes) == [("h100", 2)]
    assert gpu_split(_run(gpus=2, nodes=("node1", "node5")), nodes) == [(None, 2)]  # mixed: default price


def test_cost_follows_the_price_per_type() -> None:
    window = (T0 - timedelta(days=1), T0 + timedelta(days=1))
    runs = [_run("1", gpus=2, nodes=("node1",)),
            _run("2", gpus=1, nodes=("node5",), user="bob", elapsed=1800),
            _run("3", gpus=1, nodes=("node9",), user="bob", elapsed=900)]  # fmt: skip
    inputs = UsageInputs(*window, runs, PRICES.price, node_types={"node1": "h100", "node5": "l40s"})
    report = usage_report(inputs, "user")
    by = {g.group: g for g in report.groups}
    assert by["alice"].cost == pytest.approx(2 * 1 * 3.6)
    assert by["bob"].cost == pytest.approx(0.5 * 1.2 + 0.25 * 2.0)  # node9's type is unknown: default
    assert report.total.gpu_seconds == 2 * 3600 + 1800 + 900 and report.groups[0].group == "alice"


def test_replicas_are_recognised_and_forged_tags_refused() -> None:
    owners = {"m": DeploymentInfo("bob"), "alices": DeploymentInfo("alice")}
    assert classify(_run("7"), {"7": ("m", 2)}, owners) == ("m", 2)  # the service's own record
    assert classify(_run(user="bob", comment="hpcserve:replica:m:1"), {}, owners) == ("m", 1)
    assert classify(_run(user="bob", name="m-r3"), {}, owners) == ("m", 3)
    assert classify(_run(user="bob", comment="hpcserve:replica:alices:0"), {}, owners) is None  # not his
    assert classify(_run(user="bob", name="alices-r0"), {}, owners) is None
    assert classify(_run(user="bob", name="gone-r0"), {}, owners) is None  # a name alone needs a deployment
    assert classify(_run(user="bob", comment="hpcserve:replica:gone:0"), {}, owners) == ("gone", 0)


def test_served_nothing_is_what_idle_samples_cover() -> None:
    marks = [EngineMark(T0 + timedelta(seconds=s), busy) for s, busy in ((0, False), (2, True), (4, False),
                                                                         (60, False))]  # fmt: skip
    busy, idle = served_seconds(marks, T0, T0 + timedelta(seconds=62), cover_s=10)
    assert busy == 2 and idle == 2 + 10 + 2  # 4..14 covered; 14..60 a gap (unobserved); 60..62 the window
    assert served_seconds([], T0, T0 + timedelta(seconds=62), cover_s=10) == (0.0, 0.0)


def test_split_training_inference_busy_idle_and_cost_per_token() -> None:
    since, until = T0, T0 + timedelta(hours=2)
    runs = [_run("1", gpus=2, elapsed=3600), _run("2", user="bob", gpus=1, elapsed=3600, name="m-r0")]
    marks = {("m", 0): [EngineMark(T0 + timedelta(seconds=s), s < 1800) for s in range(0, 3600, 10)]}
    tokens = [TokenRow("k1", "carol", "m", T0.date(), 3, 400_000, 600_000)]
    inputs = UsageInputs(since, until, runs, PRICES.price, deployments={"m": DeploymentInfo("bob", "acct-m")},
                         tokens=tokens, utilisation={"1": 25.0}, engine=marks,
                         node_types={"node1": "h100"}, cover_s=10)  # fmt: skip
    report = usage_report(inputs, "deployment")
    by = {g.group: g for g in report.groups}
    dep = by["m"]
    assert (dep.inference_gpu_seconds, dep.training_gpu_seconds, dep.tokens) == (3600, 0, 1_000_000)
    assert dep.served_nothing_gpu_seconds == 1800 and dep.unobserved_replica_gpu_seconds == 0
    assert dep.cost_per_million_tokens() == pytest.approx(3.6)  # one h100 hour over a million tokens
    training = by[""]
    assert training.busy_gpu_seconds == 1800 and training.idle_gpu_seconds == 5400
    assert dep.unknown_util_gpu_seconds == 3600  # no telemetry: unknown, not idle
    accounts = {g.group: g for g in usage_report(inputs, "account").groups}
    assert accounts["acct-m"].tokens == 1_000_000  # the deployment's account
    assert [j.job_id for j in usage_report(replace(inputs, hpcserve_only=True), "user").jobs] == ["2"]


def test_a_user_sees_their_keys_and_only_sums_of_their_deployments() -> None:
    day = date(2026, 12, 7)
    rows = [TokenRow("ka", "alice", "a-dep", day, 1, 10, 10), TokenRow("kb", "bob", "a-dep", day, 1, 5, 5),
            TokenRow("kb", "bob", "b-dep", day, 1, 7, 7)]  # fmt: skip
    assert visible_tokens(rows, None, [], "key") == rows  # an admin
    assert [r.key_id for r in visible_tokens(rows, "alice", ["a-dep"], "key")] == ["ka"]
    assert [r.key_id for r in visible_tokens(rows, "alice", ["a-dep"], "user")] == ["ka"]
    wide = visible_tokens(rows, "alice", ["a-dep"], "deployment")
    assert [(r.key_id, r.deployment) for r in wide] == [("ka", "a-dep"), ("kb", "a-dep")]


def test_a_record_that_does_not_parse_is_dropped_and_a_cut_output_is_an_error() -> None:
    short = "".join(f + M for f in ("106", "alice", "acct-alice")) + "\n"  # three fields, not twelve
    assert [r.job_id for r in parse_sacct_usage(short + SACCT, NONCE)] == [
        "101",
        "102",
        "103",
        "104",
        "104",
        "105",
    ]
    with pytest.raises(SlurmParseError, match="ends inside a record"):
        parse_sacct_usage(SACCT + "107" + M + "bob", NONCE)
    assert parse_sacct_usage("", NONCE) == []


def test_recorded_sacct_output_of_the_local_cluster() -> None:
    """tests/data/sacct_usage.txt (see tests/data/README.md): the parser and the sums on Slurm's own bytes."""
    from pathlib import Path

    from hpcserve.config import load_site_config

    text = (Path(__file__).parent / "data" / "sacct_usage.txt").read_text()
    runs = parse_sacct_usage(text, NONCE)
    assert [(r.job_id, r.user, r.gpus, r.elapsed_s) for r in runs] == [
        ("44401712", "alice", 2, 2), ("44401713", "alice", 1, 3), ("44401714", "bob", 1, 2),
        ("44401715", "bob", 1, 3), ("44401716", "bob", 0, 0), ("44401715", "bob", 1, 19),
    ]  # fmt: skip
    assert runs[2].name == "a\x1fb\tc\nd" and runs[2].comment == ""  # slurmdbd keeps no comment here
    assert runs[1].gpu_types == () and runs[3].state == "REQUEUED" and runs[5].state == "CANCELLED"
    assert runs[4].start is None and runs[4].nodes == ()
    site = load_site_config(Path(__file__).parent.parent / "site_configs" / "minicluster.yaml")
    since = datetime(2026, 12, 7, 18, 55, tzinfo=UTC)
    nodes = {node: site.gpu_type_of(node) for node in ("node1", "node5")}
    report = usage_report(
        UsageInputs(since, since + timedelta(hours=1), runs, PRICES.price, node_types=nodes), "user"
    )
    by = {g.group: g for g in report.groups}
    assert (
        by["alice"].gpu_seconds == 2 * 2 + 3 and by["bob"].gpu_seconds == 2 + 3 + 19
    )  # both runs of 44401715
    assert by["alice"].cost == pytest.approx(7 / 3600 * 3.6) and by["bob"].cost == pytest.approx(
        24 / 3600 * 1.2
    )
