"""What the monitoring tests share: the shipped files under scripts/monitoring, every PromQL query in them,
and an alert's expression turned into one that shows its quantity whether or not it fires."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

MONITORING = Path(__file__).resolve().parent.parent / "scripts" / "monitoring"
PROMETHEUS_YML, ALERTS_YML = MONITORING / "prometheus.yml", MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)\s*(-?[0-9.]+(?:e[+-]?[0-9]+)?)\s*$")


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS_YML.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel."""
    return [(p["title"], t["expr"]) for p in panels() for t in p["targets"]]


def with_bool(expr: str) -> str:
    """``Q > 0`` -> ``Q > bool 0``: the comparison at the end of the expression, outside any bracket,
    answered 0 or 1 for every series of Q instead of filtering them. ValueError when the expression does not
    end in a comparison with a number at its top level."""
    depth, quoted, end = 0, "", len(expr.rstrip())
    for i, char in enumerate(expr):
        if quoted:
            quoted = "" if char == quoted and expr[i - 1] != "\\" else quoted
        elif char in "\"'`":
            quoted = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and char in "<>=!":
            match = COMPARISON.match(expr, i)
            if match and match.end() >= end:
                return f"{expr[:i]}{match[1]} bool {match[2]}"
    raise ValueError(f"{expr!r} does not end in a top-level comparison with a number")
