"""A replica with sleep mode, without Slurm: the announcement's ``models`` (parsed, refused with the field
named, stored), the engines' sleep-mode flag, a pool member's engine spec, and then a real pool replica
(``ReplicaMain`` with ``members``, in a process of its own, starting engine simulators one at a time
with the replica agent in front) that announces its agent and engines, wakes on request, and exits with
its engines on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from hpcserve.api.context import ApiContext
from hpcserve.api.replicas import MAX_MODELS, announce, parse_announce
from hpcserve.config import load_policy, load_site_config
from hpcserve.errors import HpcserveError, ValidationError
from hpcserve.serving.phases import StartPhases
from hpcserve.serving.pool_replica import EngineProcesses, engine_specs, max_awake, member_engine_spec
from hpcserve.serving.replica import ReplicaCredentials
from hpcserve.serving.spec import DeploymentSpec
from hpcserve.serving.tags import secret_hash
from hpcserve.serving.vllm_cmd import SLEEP_MODE_FLAG, simulator_argv, vllm_serve_argv
from hpcserve.store import HistoryStore
from tests.conftest import POLICY, SITE, write_weights

BODY = {"deployment": "pool", "index": 0, "job_id": "42", "host": "node1", "port": 9000}
KEY = "engine-key-for-tests"
ANY = "0.0.0.0"  # noqa: S104 (an argv item, nothing binds it here)

# the announcement's models ---------------------------------------------------------------------------------


def test_models_are_optional_and_parsed() -> None:
    assert parse_announce(BODY).models is None
    models = {"llama-8b": 8001, "org/qwen-0.5b": 65535}
    assert parse_announce({**BODY, "models": models}).models == models
    many = {f"m{i}": 8000 + i for i in range(MAX_MODELS)}
    assert parse_announce({**BODY, "models": many}).models == many


@pytest.mark.parametrize(
    ("models", "start"),
    [
        ([8001], "models: expected"),
        ({}, "models: expected"),
        ({f"m{i}": 8000 for i in range(MAX_MODELS + 1)}, "models: expected"),
        ({"two words": 8001}, "models: 'two words' is no served model name"),
        ({"": 8001}, "models: '' is no served model name"),
        ({"m\n": 8001}, "models: 'm\\n' is no served model name"),
        ({"m": 0}, "models.m: expected a port"),
        ({"m": 65536}, "models.m: expected a port"),
        ({"m": True}, "models.m: expected a port"),
        ({"m": "8001"}, "models.m: expected a port"),
    ],
)
def test_bad_models_are_refused_naming_the_field(models: Any, start: str) -> None:
    with pytest.raises(ValidationError) as exc:
        parse_announce({**BODY, "models": models})
    assert str(exc.value).startswith(start) and "\n" not in str(exc.value)


def test_the_announced_models_are_stored_and_a_plain_announcement_clears_them(tmp_path: Path) -> None:
    store = HistoryStore(f"sqlite:///{tmp_path / 'h.db'}")
    store.upgrade()
    store.create_deployment("pool", "alice", {"name": "pool", "model": "m"}, 1)
    store.upsert_replica("pool", 0, job_id="42", state="starting", secret_hash=secret_hash("s3cret"))
    api = ApiContext(load_site_config(SITE), load_policy(POLICY), store, None)  # type: ignore[arg-type]
    models = {"a": 8001, "b": 8002}
    stored = announce(api, parse_announce({**BODY, "models": models}), "s3cret", None)
    assert stored.models == models and stored.url == "http://node1:9000"
    assert store.replicas("pool")[0].models == models
    assert announce(api, parse_announce(BODY), "s3cret", None).models is None


# the engines' command line and a pool member's engine ------------------------------------------------------


def _spec(**fields: Any) -> DeploymentSpec:
    return DeploymentSpec.model_validate({"name": "d", "model": "org/m-8B", **fields})


def test_sleep_mode_flag_with_a_warm_tier_or_a_pool_only() -> None:
    for spec, flagged in ((_spec(), False), (_spec(warm_after_s=60), True), (_spec(pool="p"), True)):
        assert (SLEEP_MODE_FLAG in vllm_serve_argv(spec, ANY, 8000)) is flagged
        sim = spec.model_copy(update={"engine": "simulator"})
        assert (SLEEP_MODE_FLAG in simulator_argv(sim, ANY, 8000)) is flagged


def test_a_members_engine_gets_its_share_of_the_gpu_unless_it_sets_one() -> None:
    shape = _spec(name="pool", pool="pool", pool_max_awake=2, gpus_per_replica=2)
    member = _spec(name="a", served_model_name="a-chat", pool="pool", engine_args={"max-model-len": 4096})
    engine = member_engine_spec(shape, member)
    assert engine.engine_args == {"max-model-len": 4096, "gpu-memory-utilization": 0.45}
    assert engine.gpus_per_replica == 2 and engine.served_model_name == "a-chat"
    argv = vllm_serve_argv(engine, ANY, 8000)
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.45" and SLEEP_MODE_FLAG in argv
    quarter = member_engine_spec(shape.model_copy(update={"gpu_fraction": 0.5}), member)
    assert quarter.engine_args["gpu-memory-utilization"] == 0.25
    own = member.model_copy(update={"engine_args": {"gpu-memory-utilization": 0.3}})
    assert member_engine_spec(shape, own).engine_args == {"gpu-memory-utilization": 0.3}
    sim = member_engine_spec(shape.model_copy(update={"engine": "simulator"}), member)
    argv = simulator_argv(sim, ANY, 8000)
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.45" and SLEEP_MODE_FLAG in argv


def test_engine_specs_of_a_plain_deployment_and_of_a_pool() -> None:
    plain = _spec(warm_after_s=60)
    assert engine_specs(plain, None) == [plain] and max_awake(plain, None) == 1
    shape = _spec(name="pool", pool="pool", pool_max_awake=3)
    members = [_spec(name=n, pool="pool") for n in ("a", "b")]
    assert [e.served_model_name for e in engine_specs(shape, members)] == ["a", "b"]
    assert max_awake(shape, members) == 3
    with pytest.raises(HpcserveError, match="appear twice"):
        engine_specs(shape, [members[0], members[0]])
    with pytest.raises(HpcserveError, match="no members"):
        engine_specs(shape, [])


def test_engine_processes_stop_with_the_first_failure_as_the_jobs_status() -> None:
    engines = EngineProcesses()
    engines.start(["sleep", "30"], dict(os.environ))
    engines.start([sys.executable, "-c", "import sys; sys.exit(3)"], dict(os.environ))
    while engines.running():
        time.sleep(0.05)
    assert (
        engines.stop() == 128 + signal.SIGTERM
    )  # the first engine's: killed by SIGTERM (sleep has no handler)
    assert [p.returncode for p in engines.procs] == [-signal.SIGTERM, 3]
    engines.terminate()  # nothing left to signal: no error


# a real pool replica, in a process of its own --------------------------------------------------------------

RUNNER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from hpcserve.serving.replica import ReplicaMain

    class Main(ReplicaMain):  # the service is not here: the announcement goes to a file
        def announce(self, deployment, host, port, deadline, models=None):
            phases = self.start_phases.as_json() if self.start_phases else None
            body = {"deployment": deployment, "host": host, "port": port, "models": models, "phases": phases}
            Path(self.folder, "announced.json").write_text(json.dumps(body))

        def report_telemetry(self, deployment):
            pass

    args = json.loads(sys.argv[1])
    sys.exit(Main(**args)())
    """
)


def _sim(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "model": f"sim/{name}-1B", "engine": "simulator", "gpus_per_replica": 0, **fields}


def _run_replica(tmp_path: Path, spec: dict[str, Any], members: list[dict[str, Any]] | None) -> Any:
    (tmp_path / "replica-0.secret").write_bytes(ReplicaCredentials("s3cret", KEY).encode())
    args = {"spec": spec, "index": 0, "folder": str(tmp_path), "ready_timeout_s": 90.0,
            "secret_name": "replica-0.secret", "service_socket": None, "members": members}  # fmt: skip
    env = {**os.environ, "HPCSERVE_ENGINE_SIM_SLEEP_TIME_SCALE": "0.05"}
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(args)], env=env)
    announced = tmp_path / "announced.json"
    deadline = time.monotonic() + 90
    while not announced.exists():
        assert proc.poll() is None, f"the replica exited with {proc.returncode} before announcing"
        assert time.monotonic() < deadline, "the replica did not announce within 90 s"
        time.sleep(0.1)
    return proc, json.loads(announced.read_text())


def _stopped(proc: subprocess.Popen[bytes], ports: list[int]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    for port in ports:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_a_pool_replica_starts_its_engines_announces_its_agent_and_wakes_on_request(tmp_path: Path) -> None:
    shape = _sim("pool", pool="pool", pool_max_awake=2)
    members = [_sim(n, pool="pool") for n in ("a", "b", "c")]
    proc, note = _run_replica(tmp_path, shape, members)
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        agent = f"http://127.0.0.1:{note['port']}"
        assert note["deployment"] == "pool" and set(note["models"]) == {"a", "b", "c"}
        assert note["port"] not in note["models"].values()
        assert (
            note["phases"]["engine_load_s"] > 0 and note["phases"]["first_token_s"] > 0
        )  # the first engine's
        assert httpx.get(f"{agent}/hpcserve/engines", timeout=5).status_code == 401
        engines = httpx.get(f"{agent}/hpcserve/engines", headers=auth, timeout=5).json()
        assert engines["max_awake"] == 2
        assert {n: e["port"] for n, e in engines["engines"].items()} == note["models"]

        def sleeping() -> dict[str, bool]:  # each engine's own answer (404 without dev mode)
            urls = {n: f"http://127.0.0.1:{p}/is_sleeping" for n, p in note["models"].items()}
            return {n: httpx.get(url, timeout=5).json()["is_sleeping"] for n, url in urls.items()}

        assert sleeping() == {"a": True, "b": False, "c": False}  # one at a time: a slept before c started
        woke = httpx.post(f"{agent}/hpcserve/wake", params={"model": "a"}, headers=auth, timeout=30).json()
        assert woke["woke"] and woke["slept"] == "b"
        assert sleeping() == {"a": False, "b": True, "c": False}
        body = {"model": "a", "prompt": "hi", "max_tokens": 2}
        answer = httpx.post(f"http://127.0.0.1:{note['models']['a']}/v1/completions", json=body,
                            headers=auth, timeout=30)  # fmt: skip
        assert answer.status_code == 200
    finally:
        _stopped(proc, [note["port"], *note["models"].values()])


def test_a_plain_deployment_with_a_warm_tier_runs_one_engine_behind_the_agent(tmp_path: Path) -> None:
    proc, note = _run_replica(tmp_path, _sim("solo", warm_after_s=60), None)
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        agent = f"http://127.0.0.1:{note['port']}"
        assert list(note["models"]) == ["solo"]
        slept = httpx.post(f"{agent}/hpcserve/sleep", params={"model": "all"}, headers=auth, timeout=30)
        assert slept.json() == {"slept": ["solo"]}
        engines = httpx.get(f"{agent}/hpcserve/engines", headers=auth, timeout=5).json()
        assert engines["max_awake"] == 1 and engines["engines"]["solo"]["state"] == "asleep"
    finally:
        _stopped(proc, [note["port"], *note["models"].values()])


def test_a_pool_replicas_staging_is_its_members_stagings_added(tmp_path: Path) -> None:
    """Each member's weights from a cold folder to the node's warm tier: the first start copies both (its
    staging phase is the sum), the second finds both warm copies valid and reads nothing."""
    sizes = {"a": {"config.json": 64, "model.safetensors": 3 << 20}, "b": {"model.safetensors": 1 << 20}}
    for name, files in sizes.items():
        write_weights(tmp_path / "cold" / name, files)
    warm = {"warm_tier": str(tmp_path / "warm" / "{node}")}
    shape = _sim("pool", pool="pool", pool_max_awake=1)
    members = [_sim(n, pool="pool", model=str(tmp_path / "cold" / n), **warm) for n in sizes]
    total = sum(sum(files.values()) for files in sizes.values())
    for start, (kind, copied) in enumerate((("copied", total), ("warm-valid", 0))):
        run = tmp_path / f"start{start}"
        run.mkdir()
        proc, note = _run_replica(run, shape, members)
        _stopped(proc, [note["port"], *note["models"].values()])
        staging = StartPhases.from_json(note["phases"]).staging
        assert (staging.kind, staging.bytes) == (kind, copied), staging
        assert staging.hashed_bytes == copied  # each copy is checked once; a valid warm copy never
