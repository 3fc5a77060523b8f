"""Policy YAML from anyone: any text is a policy or a ``PolicyError`` naming what is wrong,
and a valid policy reads back as it was written."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from leangate.middleware.policy import Policy, PolicyError, parse_policy

_yaml_text = st.lists(
    st.sampled_from(
        [
            "rules:",
            "tenants:",
            "  - ",
            "name: r",
            "use: cache",
            "{",
            "}",
            "[",
            "]",
            ": ",
            "&a ",
            "*a",
            "!!python/object:os.system",
            "- ",
            "\n",
            "  ",
            "'",
            '"',
            "#",
            "limits:",
            "1",
            "-1",
        ]
    )
    | st.text(max_size=12),
    max_size=40,
).map("".join)

_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["rules", "tenants", "name", "use", "stages", "match", "limits"])
            | st.text(max_size=8),
            inner,
            max_size=4,
        )
    ),
    max_leaves=25,
)


def _policy_or_error(text: str) -> Policy | None:
    try:
        return parse_policy(text, "policy.yaml")
    except PolicyError as exc:
        assert str(exc).startswith("policy.yaml: ")
        return None


@settings(max_examples=300, deadline=None)
@given(text=_yaml_text)
def test_any_text_is_a_policy_or_a_policy_error(text: str) -> None:
    _policy_or_error(text)


@settings(max_examples=300, deadline=None)
@given(value=_values)
def test_any_yaml_value_is_a_policy_or_a_policy_error(value: Any) -> None:
    _policy_or_error(yaml.safe_dump(value))


_names = st.text(alphabet="abcdefghij-", min_size=1, max_size=10)
_limits = st.fixed_dictionaries(
    {},
    optional={
        "requests_per_minute": st.integers(1, 10_000),
        "concurrent_requests": st.integers(1, 64),
        "max_tokens": st.integers(1, 8192),
    },
)
_tenants = st.dictionaries(
    _names,
    st.fixed_dictionaries(
        {"api_keys": st.lists(st.text(alphabet="0123456789abcdef", min_size=8, max_size=12))},
        optional={"limits": _limits},
    ),
    max_size=3,
)
_rules = st.lists(
    st.fixed_dictionaries(
        {
            "name": _names,
            "match": st.fixed_dictionaries(
                {},
                optional={
                    "routes": st.lists(st.sampled_from(["chat", "completions", "*"]), min_size=1),
                    "models": st.lists(st.text(max_size=10), min_size=1, max_size=3),
                },
            ),
            "stages": st.lists(st.sampled_from(["passthrough", "cache"]), unique=True).map(
                lambda uses: [{"use": use} for use in uses]
            ),
        }
    ),
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(tenants=_tenants, rules=_rules, limits=_limits, require=st.booleans())
def test_a_valid_policy_reads_back_as_written(
    tenants: dict[str, Any], rules: list[dict[str, Any]], limits: dict[str, int], require: bool
) -> None:
    keys = [key for tenant in tenants.values() for key in tenant["api_keys"]]
    written = {"require_api_key": require, "limits": limits, "tenants": tenants, "rules": rules}
    try:
        policy = parse_policy(yaml.safe_dump(written))
    except PolicyError as exc:
        assert len(keys) != len(set(keys)), exc  # one key listed for two tenants
        return
    assert policy.require_api_key is require
    assert policy.limits.model_dump(exclude_unset=True) == limits
    assert [r.name for r in policy.rules] == [r["name"] for r in rules]
    assert [[s.use for s in r.stages] for r in policy.rules] == [
        [s["use"] for s in r["stages"]] for r in rules
    ]
    for name, tenant in tenants.items():
        for key in tenant["api_keys"]:
            assert policy.tenant_for_key(key) == name


@pytest.mark.parametrize(
    "path", [(), ("rules", 0), ("rules", 0, "match"), ("rules", 0, "stages", 0), ("limits",)]
)
def test_an_unknown_key_anywhere_is_an_error_naming_it(path: tuple[Any, ...]) -> None:
    policy: dict[str, Any] = {
        "limits": {},
        "rules": [{"name": "r", "match": {}, "stages": [{"use": "cache"}]}],
    }
    target: Any = policy
    for step in path:
        target = target[step]
    target["surplus"] = 1
    with pytest.raises(PolicyError, match="surplus"):
        parse_policy(yaml.safe_dump(policy))


def test_deeply_nested_yaml_is_a_policy_error() -> None:
    with pytest.raises(PolicyError):
        parse_policy("rules: " + "[" * 5000 + "]" * 5000)
