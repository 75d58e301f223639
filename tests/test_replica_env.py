"""``serving.replica_env``: the admin's variables for every replica job (e.g. ``HPCSERVE_TELEMETRY: "0"``,
``LD_LIBRARY_PATH`` to the site's NVML). Names the replica rests on are refused with one line; the rest are
exported by the replica's job script, and reach no command the service runs (as root or as the owner)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hpcserve.config import load_policy, load_site_config
from hpcserve.jobs.runas import Owner
from hpcserve.jobs.submit import Submitter
from hpcserve.serving.launcher import ReplicaLauncher
from hpcserve.serving.spec import DeploymentSpec
from hpcserve.slurm.models import ClusterSnapshot, Node, Partition
from hpcserve.slurm.runner import CommandResult
from hpcserve.store import Deployment
from tests.test_config import MINI, POLICY, config_error, edited

NVML = {"HPCSERVE_TELEMETRY": "0", "LD_LIBRARY_PATH": "/opt/nvidia lib", "HPCSERVE_TELEMETRY_INTERVAL_S": "1"}


# ------------------------------------------------------------------------------------- the setting
def test_replica_env_defaults_to_nothing_and_keeps_the_admins_strings(tmp_path: Path) -> None:
    assert load_site_config(MINI).serving.replica_env == {}
    site = load_site_config(edited(MINI, tmp_path, {"serving.replica_env": NVML}))
    assert site.serving.replica_env == NVML
    with pytest.raises(Exception, match="frozen"):
        site.serving.replica_env = {}  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "field", "expected"),
    [
        ({"1BAD": "x"}, "serving.replica_env.1BAD", "not an environment variable name"),
        ({"A-B": "x"}, "serving.replica_env.A-B", "not an environment variable name"),
        ({"A=B": "x"}, "serving.replica_env.A=B", "not an environment variable name"),
        ({"PATH": "/tmp/evil"}, "serving.replica_env.PATH", "reserved"),
        ({"LD_PRELOAD": "/tmp/x.so"}, "serving.replica_env.LD_PRELOAD", "remove `LD_PRELOAD` here"),
        ({"VLLM_API_KEY": "k"}, "serving.replica_env.VLLM_API_KEY", "reserved"),
        ({"HPCSERVE_SOCKET": "/tmp/s"}, "serving.replica_env.HPCSERVE_SOCKET", "reserved"),
        ({"CUDA_VISIBLE_DEVICES": "0"}, "serving.replica_env.CUDA_VISIBLE_DEVICES", "reserved"),
        ({"SLURM_JOB_ID": "1"}, "serving.replica_env.SLURM_JOB_ID", "reserved"),
        ({"SLURMD_NODENAME": "n"}, "serving.replica_env.SLURMD_NODENAME", "reserved"),
        ({"SBATCH_EXPORT": "NONE"}, "serving.replica_env.SBATCH_EXPORT", "reserved"),
        ({"PYTHONPATH": "/tmp"}, "serving.replica_env.PYTHONPATH", "reserved"),
        (
            {"HPCSERVE_TELEMETRY": 0},
            "serving.replica_env.HPCSERVE_TELEMETRY",
            'quote it: HPCSERVE_TELEMETRY: "0"',
        ),
        ({"X": "a\0b"}, "serving.replica_env.X", "NUL"),
        (["HPCSERVE_TELEMETRY=0"], "serving.replica_env", "dictionary"),
    ],
)
def test_a_bad_replica_env_is_one_line_naming_the_variable(
    tmp_path: Path, env: object, field: str, expected: str
) -> None:
    assert expected in config_error(
        load_site_config, edited(MINI, tmp_path, {"serving.replica_env": env}), field
    )


# ------------------------------------------------------------- what a replica's submission carries
@dataclass
class Snapshotting:
    """The minicluster's inference nodes, idle: all ``Submitter.plan`` reads."""

    def snapshot(self) -> ClusterSnapshot:
        nodes = tuple(Node(f"node{i}", "idle", partitions=("infer",), gpus_total=4) for i in range(4, 9))
        return ClusterSnapshot(
            datetime.now(UTC), nodes, (), (Partition("infer", tuple(n.name for n in nodes)),)
        )


@dataclass
class Recording:
    """A command runner that records each command (argv, stdin) and answers sbatch with a job id."""

    calls: list[tuple[tuple[str, ...], str | None]] = field(default_factory=list)

    def __call__(self, argv: Sequence[str], *, timeout: float, stdin: str | None = None) -> CommandResult:
        self.calls.append((tuple(argv), stdin))
        return CommandResult(tuple(argv), 0, "4242\n" if "sbatch" in argv else "", "")

    def lines(
        self, argv: Sequence[str], *, timeout: float, env: Mapping[str, str | None] | None = None
    ) -> Iterator[str]:
        raise AssertionError("not used by a launch")


def launch(env: Mapping[str, str], tmp_path: Path) -> Recording:
    runner = Recording()
    launcher = ReplicaLauncher(
        tmp_path, "runuser", runner, "/run/hpcserve/api.sock", None, 60.0,
        owner_of=lambda user: Owner(user, user), prepare=lambda *_: None, env=env,
    )  # fmt: skip
    spec = DeploymentSpec.model_validate({"name": "chat", "model": "m", "engine": "simulator",
                                          "gpus_per_replica": 1, "time_limit": "00:05:00"})  # fmt: skip
    now = datetime.now(UTC)
    deployment = Deployment("chat", "alice", spec.model_dump(mode="json"), 1, 1, now, now, None, "chat", None)
    submitter = Submitter(Snapshotting(), load_site_config(MINI), load_policy(POLICY))  # type: ignore[arg-type]
    assert launcher.launch(submitter, deployment, spec, 0).job_id == "4242"
    return runner


def test_the_replicas_script_exports_the_sites_replica_env_and_no_command_carries_it(tmp_path: Path) -> None:
    runner = launch(NVML, tmp_path)
    _helper, sbatch = runner.calls
    assert sbatch[0][:5] == ("runuser", "-u", "alice", "--", "sbatch")
    script = sbatch[1] or ""
    assert "export HPCSERVE_TELEMETRY=0\n" in script
    assert "export LD_LIBRARY_PATH='/opt/nvidia lib'\n" in script  # quoted for bash
    assert "export HPCSERVE_TELEMETRY_INTERVAL_S=1\n" in script
    assert script.index("export HPCSERVE_TELEMETRY=0") < script.index("srun")  # before the replica starts
    for argv, _ in runner.calls:  # in no argv, root's (runuser) or the owner's file helper
        assert not any("nvidia" in arg or "TELEMETRY" in arg for arg in argv), argv


def test_without_replica_env_the_script_exports_none_of_it(tmp_path: Path) -> None:
    _, sbatch = launch({}, tmp_path).calls
    assert "HPCSERVE_TELEMETRY" not in (sbatch[1] or "") and "LD_LIBRARY_PATH" not in (sbatch[1] or "")
