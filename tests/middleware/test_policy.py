"""Policy files: validation, matching, tenants, narrowing, reload, and the CLI check."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from leangate.middleware.chains import PolicyWatcher
from leangate.middleware.policy import ANONYMOUS, Policy, PolicyError, parse_policy

GOOD = """
tenants:
  acme: {api_keys: [sk-acme]}
  globex: {api_key_sha256: ["%s"]}
rules:
  - name: chat-small
    match: {routes: [chat], models: ["Smol*"], tenants: [acme]}
    stages:
      - use: passthrough
        budget_ms: 10
  - name: everything-else
"""


def good_policy() -> Policy:
    import hashlib

    return parse_policy(GOOD % hashlib.sha256(b"sk-globex").hexdigest())


def test_rules_match_route_model_and_tenant() -> None:
    policy = good_policy()
    found = policy.rule_for("chat", "SmolLM2-135M", "acme")
    assert found is not None and found[1].name == "chat-small"
    for route, model, tenant in [
        ("completions", "SmolLM2", "acme"),
        ("chat", "llama", "acme"),
        ("chat", "SmolLM2", "globex"),
    ]:
        other = policy.rule_for(route, model, tenant)  # type: ignore[arg-type]
        assert other is not None and other[1].name == "everything-else"


def test_tenants_come_from_api_keys() -> None:
    policy = good_policy()
    assert policy.tenant_for_key("sk-acme") == "acme"
    assert policy.tenant_for_key("sk-globex") == "globex"
    assert policy.tenant_for_key(None) == ANONYMOUS
    stranger = policy.tenant_for_key("sk-someone")
    assert stranger is not None and stranger.startswith("key-")
    assert stranger != policy.tenant_for_key("sk-someone-else")
    strict = parse_policy("require_api_key: true\ntenants: {a: {api_keys: [k]}}")
    assert strict.tenant_for_key("k") == "a"
    assert strict.tenant_for_key("other") is None
    assert strict.tenant_for_key(None) is None


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("rules: [{name: r, colour: blue}]", "rules.0.colour"),
        ("rules: [{name: r, stages: [{use: nope}]}]", "unknown stage 'nope'"),
        ("rules: [{name: r, stages: [{use: passthrough, settings: {x: 1}}]}]", "settings.x"),
        ("rules: [{name: r, match: {routes: [embeddings]}}]", "rules.0.match.routes.0"),
        ("tenants: {a: {api_keys: [k]}, b: {api_keys: [k]}}", "listed for tenants"),
        ("budget: 3", "budget"),
        ("rules: [{name: r", "not valid YAML"),
    ],
)
def test_invalid_policies_name_the_field(text: str, names: str) -> None:
    with pytest.raises(PolicyError) as error:
        parse_policy(text)
    assert names in str(error.value)


def test_watcher_reloads_and_keeps_the_old_policy_on_error(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("rules: [{name: first}]")
    seen: list[Policy | None] = []
    watcher = PolicyWatcher(path, seen.append)
    assert watcher.check() is False
    time.sleep(0.01)
    path.write_text("rules: [{name: second}, {name: third}]")
    assert watcher.check() is True
    assert seen[-1] is not None and [r.name for r in seen[-1].rules] == ["second", "third"]
    path.write_text("rules: [{name: broken, oops: 1}]")
    assert watcher.check() is False
    assert seen[-1] is None and watcher.last_error and "oops" in watcher.last_error


def test_policy_check_command(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("rules: [{name: r, stages: [{use: passthrough}]}]")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [{name: r, stagez: []}]")
    run = [sys.executable, "-m", "leangate", "policy", "check"]
    ok = subprocess.run([*run, str(good)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "ok" in ok.stdout
    failed = subprocess.run([*run, str(bad)], capture_output=True, text=True, check=False)
    assert failed.returncode == 1 and "rules.0.stagez" in failed.stderr
