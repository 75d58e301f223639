"""The site's storage section at a replica's launch: warm tier, cold tier and vLLM's load format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from hpcserve.config import load_site_config
from hpcserve.config.sections import LOAD_FORMATS, Storage
from hpcserve.errors import ConfigError
from hpcserve.serving.site_storage import cold_model, members_with_site_storage, with_site_storage
from hpcserve.serving.spec import DeploymentSpec
from hpcserve.serving.vllm_cmd import vllm_serve_argv
from hpcserve.serving.vllm_flags import VLLM_SERVE_FLAGS
from tests.conftest import SITE

STORAGE = Storage.model_validate(
    {
        "cold": {"path": "/shared/models"},
        "warm": {"path": "/local/{node}/models"},
        "load_format": "runai_streamer",
    }
)
COLD = {"/shared/models/org/llama-8b"}


def spec(**fields: Any) -> DeploymentSpec:
    return DeploymentSpec.model_validate({"name": "chat", "model": "org/llama-8b", **fields})


def test_what_the_deployment_leaves_out_comes_from_the_site() -> None:
    got = with_site_storage(spec(), STORAGE, COLD.__contains__)
    assert got.warm_tier == "/local/{node}/models"
    assert got.model == "/shared/models/org/llama-8b"
    assert got.engine_args == {"load-format": "runai_streamer"}
    argv = vllm_serve_argv(got, "127.0.0.1", 8000)
    assert argv[argv.index("--load-format") + 1] == "runai_streamer"
    assert argv[2] == "/shared/models/org/llama-8b"


def test_what_the_deployment_gives_stands() -> None:
    mine = spec(model="/home/alice/llama", warm_tier="/local/{node}/models/alice",
                engine_args={"load_format": "safetensors"})  # fmt: skip
    got = with_site_storage(mine, STORAGE, lambda path: True)
    assert (got.model, got.warm_tier) == ("/home/alice/llama", "/local/{node}/models/alice")
    assert got.engine_args == {"load-format": "safetensors"}
    assert with_site_storage(spec(), None) == spec()


def test_a_hub_id_not_in_the_cold_tier_stays_a_hub_id() -> None:
    assert (
        with_site_storage(spec(model="Qwen/Qwen3-0.6B"), STORAGE, COLD.__contains__).model
        == "Qwen/Qwen3-0.6B"
    )
    assert cold_model("../etc", "/shared/models", lambda path: True) is None
    assert cold_model("./llama", "/shared/models", lambda path: True) is None


def test_the_engine_simulator_gets_no_load_format() -> None:
    got = with_site_storage(spec(engine="simulator", gpus_per_replica=0), STORAGE, COLD.__contains__)
    assert got.engine_args == {}


def test_load_formats_are_vllms(tmp_path: Path) -> None:
    assert "--load-format" in VLLM_SERVE_FLAGS
    assert {"runai_streamer", "fastsafetensors", "safetensors"} <= set(LOAD_FORMATS)
    data = yaml.safe_load(SITE.read_text())
    data["storage"]["load_format"] = "fastsafetensors"
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(data))
    assert load_site_config(tmp_path / "site.yaml").storage.load_format == "fastsafetensors"
    data["storage"]["load_format"] = "fast"
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(
        ConfigError, match=r"storage\.load_format.*unknown load format 'fast'.*runai_streamer"
    ):
        load_site_config(tmp_path / "site.yaml")


def test_each_pool_member_gets_the_sites_storage_as_a_deployment_would() -> None:
    stored = [spec(name="a", pool="p").model_dump(mode="json"),
              spec(name="b", pool="p", model="/home/alice/b").model_dump(mode="json")]  # fmt: skip
    a, b = members_with_site_storage(stored, STORAGE, COLD.__contains__)
    warm = "/local/{node}/models"
    assert (a.model, a.warm_tier, a.served_model_name) == ("/shared/models/org/llama-8b", warm, "a")
    assert (b.model, b.warm_tier) == ("/home/alice/b", warm)
    assert members_with_site_storage(stored, None)[0].model == "org/llama-8b"


def test_a_warm_tier_may_give_each_user_a_folder_and_the_cold_tier_may_not(tmp_path: Path) -> None:
    data = yaml.safe_load(SITE.read_text())
    data["storage"] = {"cold": {"path": "/shared/models"}, "warm": {"path": "/local/{node}/{user}/models"}}
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(data))
    warm = load_site_config(tmp_path / "site.yaml").storage.warm
    assert warm is not None and warm.path_for("node5", "alice") == Path("/local/node5/alice/models")
    for cold, word in (("/shared/{user}/models", "{user}"), ("/shared/{node}", "{node}")):
        data["storage"]["cold"]["path"] = cold
        (tmp_path / "site.yaml").write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError, match=rf"storage\.cold\.path.*cannot depend on {word}"):
            load_site_config(tmp_path / "site.yaml")
    data["storage"] = {"cold": {"path": "/shared"}, "warm": {"path": "/local/{host}"}}
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"bad placeholder.*use only \{node\} and \{user\}"):
        load_site_config(tmp_path / "site.yaml")
