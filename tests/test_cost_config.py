"""The site's GPU-hour prices (``cost:``): lookup by GRES type, and one clear line for each bad value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from hpcserve.config import SiteConfig, load_site_config
from hpcserve.config.sections import CostSettings
from hpcserve.errors import ConfigError

MINI = Path(__file__).resolve().parent.parent / "site_configs" / "minicluster.yaml"


def test_price_by_type_then_default() -> None:
    cost = CostSettings(gpu_hour_price={"default": 2.5, "a100": 3.2})
    assert cost.price("a100") == 3.2
    assert cost.price("A100") == 3.2  # Slurm's type names are compared case-insensitively
    assert cost.price("l40s") == 2.5
    assert cost.price(None) == 2.5  # untyped gres/gpu=N
    assert CostSettings(gpu_hour_price={"a100": 3.2}).price("h100") == 0.0  # no default: free
    assert CostSettings().currency == "USD"


def test_minicluster_ships_prices() -> None:
    site = load_site_config(MINI)
    assert site.cost.price("h100") > site.cost.price("l40s") > 0
    assert SiteConfig.model_fields["cost"].default_factory is CostSettings


def _load_with_cost(tmp_path: Path, cost: Any) -> str:
    data = yaml.safe_load(MINI.read_text())
    data["cost"] = cost
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_site_config(path)
    text = str(info.value)
    assert "\n" not in text and "fix:" in text
    return text


@pytest.mark.parametrize(
    ("cost", "expected"),
    [
        (
            {"gpu_hour_price": {"h100": -1}},
            "cost.gpu_hour_price.h100: price -1.0 is not a finite number >= 0",
        ),
        ({"gpu_hour_price": {"h100": ".nan"}}, "cost.gpu_hour_price.h100"),
        ({"gpu_hour_price": {"h100": "cheap"}}, "cost.gpu_hour_price.h100: input should be a valid number"),
        ({"gpu_hour_price": {"": 1.0}}, "cost.gpu_hour_price: an empty GPU type"),
        ({"currency": ""}, "cost.currency"),
        ({"price": 1.0}, "cost.price: unknown field"),
    ],
)
def test_bad_cost(tmp_path: Path, cost: Any, expected: str) -> None:
    assert expected in _load_with_cost(tmp_path, cost)
