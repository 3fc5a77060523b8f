"""``docs/policy.md`` is generated from the policy's pydantic models and kept in sync."""

from __future__ import annotations

from pathlib import Path

import pytest

from leangate.cli import main
from leangate.middleware.policy import parse_policy
from leangate.middleware.registry import BUILTIN, known_stages
from leangate.policy_doc import EXAMPLE, render

DOC = Path(__file__).resolve().parents[1] / "docs" / "policy.md"


def test_docs_policy_md_is_generated() -> None:
    assert DOC.read_text() == render(), (
        "docs/policy.md is out of date with the policy models: "
        "run `leangate policy doc > docs/policy.md`"
    )


def test_every_registered_stage_has_a_section() -> None:
    text = render()
    own = {name for name, target in known_stages().items() if target.startswith("leangate.")}
    for name in sorted(own | set(BUILTIN)):
        assert f"\n### `{name}`\n" in text, f"stage {name!r} has no section in the reference"


def test_the_example_is_a_valid_policy() -> None:
    policy = parse_policy(EXAMPLE, "the reference's example")
    assert policy.tenant_for_key("sk-globex-1") == "globex"


def test_render_is_stable() -> None:
    assert render() == render()


def test_cli_prints_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["policy", "doc"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == render()
