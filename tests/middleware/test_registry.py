"""Finding stages: leangate's own through its entry points, others' by entry point or by
import string."""

from __future__ import annotations

import importlib.metadata

import pytest

from leangate.middleware import registry
from leangate.middleware.policy import Policy
from leangate.middleware.stages import ExampleFanout, PassThrough


def test_builtin_stages_are_declared_as_entry_points() -> None:
    declared = {
        e.name: e.value for e in importlib.metadata.entry_points(group=registry.ENTRY_POINT_GROUP)
    }
    assert declared == registry.BUILTIN, "pyproject.toml and BUILTIN list the same stages"


def test_a_third_party_entry_point_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    extra = importlib.metadata.EntryPoint(
        "shout", "leangate.middleware.stages:PassThrough", registry.ENTRY_POINT_GROUP
    )
    shadow = importlib.metadata.EntryPoint(
        "cache", "somewhere.else:Cache", registry.ENTRY_POINT_GROUP
    )

    def entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
        assert group == registry.ENTRY_POINT_GROUP
        return [extra, shadow]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    registry.known_stages.cache_clear()
    try:
        assert registry.stage_class("shout") is PassThrough
        assert registry.known_stages()["cache"] == registry.BUILTIN["cache"], "no shadowing"
    finally:
        registry.known_stages.cache_clear()


def test_a_policy_can_name_a_stage_by_import_string() -> None:
    policy = Policy.model_validate(
        {"rules": [{"name": "r", "stages": [{"use": "leangate.middleware.stages:ExampleFanout"}]}]}
    )
    assert registry.stage_class(policy.rules[0].stages[0].use) is ExampleFanout


def test_unknown_stages_are_named_in_the_error() -> None:
    known = "known stages: cache, compress, decompose, example-fanout, passthrough, prune, rag, sot"
    with pytest.raises(ValueError, match=known):
        registry.stage_class("nope")
    with pytest.raises(ValueError, match="cannot be imported"):
        registry.stage_class("no.such.module:Stage")
