"""Parsers against output recorded from the real Slurm 22.05 cluster (tests/data/README.md)."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hpcserve.errors import SlurmParseError
from hpcserve.inventory import jobs_json
from hpcserve.slurm import parsers
from hpcserve.slurm.commands import NONCE, is_job_id, record_mark, squeue_argv, squeue_env
from hpcserve.slurm.models import Job, JobState, tag_of
from hpcserve.slurm.protocol import JobFilter
from hpcserve.slurm.runner import SubprocessRunner

DATA = Path(__file__).parent / "data"
NOW = datetime(2026, 11, 22, 22, 0, 0, tzinfo=UTC)  # the moment the fixtures are "observed"
RECORDED = "0123456789abcdef"  # the nonce the recordings were made with (tests/data/README.md)


def read(name: str) -> str:
    """As the runner reads a command's output: UTF-8 with replacement (a job name may be any bytes)."""
    return (DATA / name).read_bytes().decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def jobs() -> dict[str, Job]:
    return {j.id: j for j in parsers.parse_squeue(read("squeue_jobs.txt"), NOW, RECORDED)}


def test_squeue_running_two_node_job(jobs: dict[str, Job]) -> None:
    job = jobs["10731000"]
    assert job.name == "two node|x"  # the separator is 0x1f, so "|" in a name is harmless
    assert (job.state, job.partition, job.user, job.account) == (
        JobState.RUNNING,
        "train",
        "root",
        "hpcserve",
    )
    assert job.nodes == ("node1", "node2") and job.num_nodes == 2
    assert job.gpus == 4  # --gres=gpu:2 on 2 nodes: tres-alloc counts the whole job
    assert job.tag == "hpcserve:train:demo"
    assert job.time_limit_s == 600
    assert job.wait_s == 1.0  # started one second after submission


@pytest.mark.parametrize(
    ("job_id", "gpus"),
    [("10731001", 3), ("10731002", 2), ("10731003", 1), ("10731005", 1), ("10731004_2", 0)],
)
def test_squeue_gpus_for_every_request_style(jobs: dict[str, Job], job_id: str, gpus: int) -> None:
    # --gpus-per-node=3, --gpus=2 (a per-job request %b does not show), held --gres=gpu:h100:1, held --gpus=1
    assert jobs[job_id].gpus == gpus


def test_squeue_pending_array_tasks_and_long_fields(jobs: dict[str, Job]) -> None:
    tasks = [j for j in jobs.values() if j.job_id == 10731004]
    assert sorted(j.id for j in tasks) == [f"10731004_{i}" for i in range(4)]
    held = jobs["10731005"]
    assert held.state.is_pending and held.start is None and held.nodes == ()
    assert held.reason == "JobHeldUser"
    assert held.name == "a-very-long-job-name-that-exceeds-twenty-characters-for-sure"
    assert held.tag == "hpcserve:replica:llama-3-8b-instruct-with-long-name:17"
    assert jobs["10731001"].tag is None and jobs["10731001"].comment == ""
    assert (
        held.wait_s == (NOW - datetime(2026, 11, 22, 21, 53, 41, tzinfo=UTC)).total_seconds()
    )  # still waiting


def test_squeue_output_that_ends_inside_a_record_is_an_error() -> None:
    # e.g. a squeue that did not get the format: no line ends with the mark
    with pytest.raises(SlurmParseError, match="ends inside a record"):
        parsers.parse_squeue("123\x1fonly-two\n", NOW, RECORDED)


def test_a_record_that_does_not_parse_is_dropped_and_the_others_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mark = record_mark(RECORDED)
    good = read("squeue_jobs.txt").split("\n")[0] + "\n"
    bad = f"123\x1fonly-two{mark}{mark}\nnot-a-job-id\x1f{'x' * 20}{mark}{mark}\n"
    assert [j.id for j in parsers.parse_squeue(bad + good, NOW, RECORDED)] == ["10731004_0"]
    assert caplog.text.count("dropped a record that does not parse") == 2


def test_sinfo_json_nodes() -> None:
    nodes = {n.name: n for n in parsers.parse_sinfo_json(read("sinfo_nodes.json"))}
    assert len(nodes) == 8
    assert all(n.gpus_total == 4 for n in nodes.values())
    assert (nodes["node1"].gpu_type, nodes["node8"].gpu_type) == ("h100", "l40s")
    assert nodes["node1"].gpus_alloc == 2 and nodes["node1"].gpus_free == 2
    assert nodes["node5"].gpus_alloc == 3 and nodes["node7"].gpus_alloc == 0
    assert nodes["node1"].partitions == ("train", "all")
    assert nodes["node5"].features == ("roce", "nvme", "l40s")
    drained = nodes["node4"]
    assert drained.flags == {"DRAIN"} and drained.reason == "nccl probe slow"
    assert not drained.available and drained.gpus_free == 0 and drained.display_state == "drained"
    assert nodes["node3"].available and nodes["node3"].display_state == "idle"


def test_sinfo_json_garbage_is_a_parse_error() -> None:
    with pytest.raises(SlurmParseError, match="sinfo --json"):
        parsers.parse_sinfo_json("sinfo: error: something")


def test_partitions() -> None:
    parts = {p.name: p for p in parsers.parse_partitions(read("scontrol_partitions.txt"))}
    assert set(parts) == {"train", "infer", "all"}
    train = parts["train"]
    assert train.default and train.nodes == ("node1", "node2", "node3", "node4")
    assert (train.max_time_s, train.default_time_s, train.priority_tier) == (7 * 86400, 3600, 10)
    assert train.total_gpus == 16 and parts["all"].total_gpus == 32
    assert parts["all"].priority_tier == 1 and parts["all"].max_time_s == 86400


def test_topology() -> None:
    topo = parsers.parse_topology(read("scontrol_topology.txt"))
    assert [s.name for s in topo.leaves] == ["leaf1", "leaf2"]
    assert topo.leaf_of("node3") == "leaf1" and topo.leaf_of("node8") == "leaf2"
    spine = next(s for s in topo.switches if s.name == "spine")
    assert spine.level == 1 and spine.switches == ("leaf1", "leaf2")


def test_sacct_records() -> None:
    recs = {r.job_id: r for r in parsers.parse_sacct(read("sacct_jobs.txt"), RECORDED)}
    two = recs["10731000"]
    assert two.state is JobState.CANCELLED  # "CANCELLED by 0"
    assert (two.nodes, two.gpus, two.elapsed_s) == (("node1", "node2"), 4, 326)
    never_ran = recs["10731003"]
    assert never_ran.nodes == () and never_ran.start is None and never_ran.end is not None


def test_kv_line_values_with_spaces() -> None:
    line = (
        "NodeName=node1 OS=Linux 6.1.0 #1 SMP PREEMPT_DYNAMIC  RealMemory=16000 Reason=slow nic [root@12:00]"
    )
    kv = parsers.parse_kv_line(line)
    assert kv["OS"] == "Linux 6.1.0 #1 SMP PREEMPT_DYNAMIC"
    assert kv["RealMemory"] == "16000" and kv["Reason"] == "slow nic [root@12:00]"


@pytest.mark.parametrize(
    ("gres", "expected"),
    [("gpu:h100:4", (4, "h100")), ("gpu:2", (2, None)), ("gpu:a100:4(S:0-1),nic:1", (4, "a100")),
     ("gpu:h100:2(IDX:0-1,3)", (2, "h100")), ("(null)", (0, None)), ("", (0, None))],
)  # fmt: skip
def test_gpu_gres(gres: str, expected: tuple[int, str | None]) -> None:
    assert parsers.parse_gpu_gres(gres) == expected


@pytest.mark.parametrize(
    ("text", "ok"),
    [("123", True), ("123_4", True), ("123_[1-5]", True), ("-1", False), ("abc", False), ("123;rm", False),
     ("", False)],
)  # fmt: skip
def test_job_id_syntax(text: str, ok: bool) -> None:
    assert is_job_id(text) is ok


def test_sbatch_output() -> None:
    assert parsers.parse_sbatch("10731000\n") == "10731000"
    assert parsers.parse_sbatch("10731000;hpcmini\n") == "10731000"
    with pytest.raises(SlurmParseError):
        parsers.parse_sbatch("sbatch: error: Batch job submission failed")


def test_ps_json_records_from_recorded_squeue(jobs: dict[str, Job]) -> None:
    records = {r["id"]: r for r in json.loads(jobs_json(jobs.values()))}
    assert len(records) == len(jobs) == 9
    two = records["10731000"]
    assert two["nodes"] == ["node1", "node2"] and two["gpus"] == 4 and two["state"] == "RUNNING"
    assert two["tag"] == "hpcserve:train:demo" and two["wait_s"] == 1.0
    assert two["submit"] == "2026-11-22T21:53:31Z" and two["time_limit_s"] == 600
    held = records["10731005"]
    assert held["start"] is None and held["wait_s"] == 379.0 and held["reason"] == "JobHeldUser"
    assert set(held) == set(Job.__struct_fields__)


# ------------------------------------------------------------------- other users' names and comments
HOSTILE = {"bob": ("37061011", "37061012", "37061013", "37061014"), "alice": ("37061015",)}


@pytest.fixture(scope="module")
def hostile() -> dict[str, Job]:
    return {j.id: j for j in parsers.parse_squeue(read("squeue_hostile.txt"), NOW, RECORDED)}


def test_hostile_names_and_comments_stay_in_their_own_job(hostile: dict[str, Job]) -> None:
    assert sorted(hostile) == sorted(i for ids in HOSTILE.values() for i in ids)  # no forged 99999
    assert all(hostile[i].user == user for user, ids in HOSTILE.items() for i in ids)
    first = hostile["37061011"]
    assert (first.name, first.comment) == ("a\x1fb\tc\nd", "x\x1fhpcserve:replica:foo:0\ny")
    assert hostile["37061012"].name == "n" + "".join(f"\x1f{i}" for i in range(1, 17))
    forger = hostile["37061013"]
    assert forger.name.startswith("hpcserve:replica:alice-dep:1\n99999\x1f99999\x1falice")
    assert forger.comment.startswith("old\x1fhpcserve:replica:alice-dep:2\n99999")
    assert hostile["37061014"].name == "bad\ufffd\ufffdutf\r\x1c\x1d\x1e\ufffd"  # not UTF-8: replaced
    for job in hostile.values():  # Slurm's own fields are each job's own
        assert (job.partition, job.state, job.nodes, job.gpus, job.account) == (
            "infer", JobState.RUNNING, ("node5",), 0, f"acct-{job.user}",
        )  # fmt: skip
    assert {j.id: j.tag for j in hostile.values() if j.tag} == {"37061015": "hpcserve:replica:alice-dep:0"}


def test_hostile_output_read_as_the_runner_reads_it() -> None:
    """Text mode turns a carriage return in a name into a newline: still one record per job."""
    stream = io.TextIOWrapper(io.BytesIO((DATA / "squeue_hostile.txt").read_bytes()), errors="replace")
    jobs = list(parsers.iter_squeue(stream, NOW, RECORDED))
    assert [j.user for j in jobs] == ["bob"] * 4 + ["alice"]
    assert jobs[3].name == "bad\ufffd\ufffdutf\n\x1c\x1d\x1e\ufffd"


def test_hostile_sacct_records() -> None:
    recs = {r.job_id: r for r in parsers.parse_sacct(read("sacct_hostile.txt"), RECORDED)}
    assert sorted(recs) == sorted(i for ids in HOSTILE.values() for i in ids)
    assert all(recs[i].user == user for user, ids in HOSTILE.items() for i in ids)
    assert recs["37061011"].name == "a\x1fb\tc\nd" and recs["37061013"].name.endswith("\x1fdeadbeefdeadbeef")
    assert {r.state for r in recs.values()} == {JobState.CANCELLED}


def _record(name: str, comment: str, job_id: int, nonce: str) -> str:
    mark = record_mark(nonce)
    fixed = [str(job_id), str(job_id), "bob", "acct-bob", "infer", "normal", "RUNNING", "1", "node5",
             "cpu=1,gres/gpu=2", "2026-11-22T21:53:31", "2026-11-22T21:53:32", "5:00", "None"]  # fmt: skip
    return "\x1f".join([*fixed, name]) + mark + comment + mark + "\n"


@settings(max_examples=300, deadline=None)
@given(name=st.text(), comment=st.text(), nonce=st.text("0123456789abcdef", min_size=16, max_size=16))
def test_any_name_and_comment_stay_one_job(name: str, comment: str, nonce: str) -> None:
    assume(nonce not in name + comment)  # the nonce is secret: a user cannot write it
    text = _record("before", "", 1, nonce) + _record(name, comment, 2, nonce) + _record("after", "", 3, nonce)
    jobs = parsers.parse_squeue(text, NOW, nonce)
    assert [(j.job_id, j.user, j.gpus) for j in jobs] == [(1, "bob", 2), (2, "bob", 2), (3, "bob", 2)]
    assert (jobs[1].name, jobs[1].comment or "") == (
        name,
        "" if comment in {"(null)", "N/A", "None"} else comment,
    )
    assert jobs[1].tag in (None, jobs[1].comment) and "\n" not in (jobs[1].tag or "")


@pytest.mark.parametrize(
    ("comment", "tag"),
    [("hpcserve:replica:foo:0", "hpcserve:replica:foo:0"), ("hpcserve:replica:foo:0\ny", None),
     ("hpcserve:replica:foo\x1f:0", None), ("hpcserve:train:x\t", None), ("x hpcserve:replica:foo:0", None)],
)  # fmt: skip
def test_a_tag_is_one_printable_line(comment: str, tag: str | None) -> None:
    assert tag_of(comment) == tag


def test_the_squeue_format_goes_through_the_environment_not_argv() -> None:
    env = squeue_env()
    assert (
        env["SQUEUE_FORMAT"] is None and env["SLURM_TIME_FORMAT"] is None
    )  # unset: they win or change times
    assert (env["SQUEUE_FORMAT2"] or "").endswith(f"Name:{record_mark()},Comment:{record_mark()}")
    assert not any(NONCE in a for a in squeue_argv(JobFilter(user="alice")))  # argv is world-readable


def test_runner_applies_env_changes_and_replaces_bytes_that_are_not_utf8() -> None:
    runner = SubprocessRunner({"KEEP": "1", "DROP": "1"})
    env = list(runner.lines(["env"], timeout=10, env={"DROP": None, "ADD": "2"}))
    assert sorted(env) == ["ADD=2\n", "KEEP=1\n"]
    assert list(runner.lines(["printf", "a\\377b\\n"], timeout=10)) == ["a\ufffdb\n"]
    assert runner(["printf", "\\376"], timeout=10).stdout == "\ufffd"


def test_squeue_counts_a_jobs_gpu_shards() -> None:
    nonce = "0123456789abcdef"
    shard = _record("quarter", "", 7, nonce).replace(
        "cpu=1,gres/gpu=2", "cpu=1,mem=1G,node=1,billing=1,gres/shard=2"
    )
    (job,) = parsers.parse_squeue(shard, NOW, nonce)  # as squeue -O tres-alloc prints a --gres=shard:2 job
    assert (job.gpus, job.shards) == (0, 2)
    (whole,) = parsers.parse_squeue(_record("whole", "", 8, nonce), NOW, nonce)
    assert (whole.gpus, whole.shards) == (2, 0)
