"""``leangate model info|prepare``: what is on disk, and one clear line when a step fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from leangate.cli import main


def test_info_reports_every_part_missing_in_an_empty_home(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["model", "info", "--home", str(tmp_path)])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["vllm", "missing"],
        ["model", "missing"],
        ["embedder", "missing"],
    ]
    assert all(str(tmp_path) in line for line in lines)


def test_prepare_fails_in_one_line_with_a_non_zero_exit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "a-file"
    home.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_:
        main(["model", "prepare", "--only", "vllm", "--home", str(home)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: preparing vllm failed:")


def test_prepare_skips_what_is_ready(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The embedder set-up exported (scripts/setup.sh) is found, not exported again."""
    with pytest.raises(SystemExit) as exit_:
        main(["model", "prepare", "--only", "embedder"])
    assert exit_.value.code == 0
    assert "embedder: ready at" in capsys.readouterr().err
