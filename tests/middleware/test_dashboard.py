"""The Grafana dashboard under docs/ queries only metrics the proxy exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from leangate.middleware.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "leangate.json"
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


def _exported() -> set[str]:
    return {collector.name for collector in Metrics().registry.collect()}


def _queried() -> set[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [target["expr"] for panel in panels for target in panel["targets"]]
    assert exprs, "the dashboard has queries"
    names = set()
    for name in re.findall(r"\bleangate_[a-z_]+", " ".join(exprs)):
        for suffix in SUFFIXES:
            if name.endswith(suffix):
                name = name.removesuffix(suffix)
                break
        names.add(name)
    return names


def test_every_queried_metric_is_exported() -> None:
    missing = _queried() - _exported()
    assert not missing, f"the dashboard queries metrics nobody exports: {sorted(missing)}"


def test_every_exported_metric_has_a_panel() -> None:
    unseen = _exported() - _queried()
    assert not unseen, f"metrics without a panel: {sorted(unseen)}"
