"""The engine simulator has one source of defaults (hpcserve.model.engine_defaults.ENGINE_SIM): SimConfig,
the flags of ``hpcserve engine-sim`` and a deployment's ``simulator:`` settings all read it."""

from __future__ import annotations

import dataclasses

import click

from hpcserve.cli.engine_cmd import engine_sim
from hpcserve.enginesim.core import SimConfig
from hpcserve.model.engine_defaults import ENGINE_SIM
from hpcserve.serving.spec import SimulatorSettings

# SimConfig's field names where they differ from the flags' (and the unit: seconds, not ms)
RENAMED = {"max_num_seqs": "max_batch", "decode_ms_per_token": "decode_s_per_token"}


def flag_defaults() -> dict[str, object]:
    return {p.name: p.default for p in engine_sim.params if isinstance(p, click.Option) and p.name}


def test_sim_config_reads_every_default() -> None:
    config = SimConfig(model="m")
    for field in dataclasses.fields(ENGINE_SIM):
        value = getattr(ENGINE_SIM, field.name)
        if field.name == "decode_ms_per_token":
            assert config.decode_s_per_token == value / 1000
        else:
            assert getattr(config, RENAMED.get(field.name, field.name)) == value, field.name


def test_the_flags_and_the_spec_settings_read_the_same_defaults() -> None:
    flags = flag_defaults()
    for name in ("host", "port", "max_num_seqs", "prefill_tokens_per_s", "decode_ms_per_token",
                 "decode_growth", "max_model_len", "kv_tokens", "seed", "sleep_time_scale"):  # fmt: skip
        assert flags[name] == getattr(ENGINE_SIM, name), name
    assert flags["startup_delay"] == ENGINE_SIM.startup_delay_s
    assert flags["drain_timeout"] == ENGINE_SIM.drain_timeout_s
    settings = SimulatorSettings()
    for name in SimulatorSettings.model_fields:
        assert getattr(settings, name) == getattr(ENGINE_SIM, name), name
