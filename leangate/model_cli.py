"""``leangate model prepare|info``: the bundled model, its vLLM and the embedder, offline.

``prepare`` does once what ``leangate up`` and the tests would otherwise do on first use:
the vLLM CPU environment (``$LEANGATE_HOME/vllm-venv``, about a gigabyte), the bundled
SmolLM2-135M-Instruct converted from GGUF to a Hugging Face folder, and the embedder's ONNX
export. Each step is skipped when its result is already on disk, so it is safe to re-run.
``info`` says where each piece lives and whether it is ready, without changing anything.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

PARTS = ("vllm", "model", "embedder")


@dataclass(frozen=True)
class Part:
    """One thing ``prepare`` makes: where it lives, how to tell it is ready, how to make it."""

    name: str
    where: Path
    ready: Callable[[], bool]
    make: Callable[[], object]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="model_command", required=True)
    prepare = commands.add_parser(
        "prepare", help="install vLLM, convert the model, export the embedder"
    )
    prepare.add_argument(
        "--only", choices=PARTS, action="append", help="prepare only this part (repeatable)"
    )
    commands.add_parser("info", help="where each part lives and whether it is ready")
    for command in commands.choices.values():
        command.add_argument(
            "--home", type=Path, help="default: $LEANGATE_HOME or ~/.cache/leangate"
        )


def run(args: argparse.Namespace) -> int:
    parts = _parts(args.home)
    console = Console(stderr=True)
    if args.model_command == "info":
        for part in parts:
            state = "ready" if part.ready() else "missing"
            print(f"{part.name:9} {state:8} {part.where}")
        return 0
    chosen = [part for part in parts if not args.only or part.name in args.only]
    for part in chosen:
        if part.ready():
            console.print(f"[green]✓[/] {part.name}: ready at {part.where}")
            continue
        started = time.monotonic()
        try:
            with console.status(f"preparing {part.name} ({part.where})"):
                part.make()
        except Exception as exc:  # one line and a non-zero exit, whatever failed
            print(f"error: preparing {part.name} failed: {exc}", file=sys.stderr)
            return 1
        took = time.monotonic() - started
        console.print(f"[green]✓[/] {part.name}: prepared in {took:.0f} s at {part.where}")
    return 0


def _parts(home: Path | None) -> list[Part]:
    from leangate.backend import localvllm
    from leangate.cache._onnx import export_path
    from leangate.cache.embedder import Embedder, EmbedderSettings

    config = localvllm.LocalVLLMConfig() if home is None else localvllm.LocalVLLMConfig(home=home)
    embedder_settings = EmbedderSettings(
        export_dir=None if home is None else home / "embedders", backend="onnx"
    )
    embedder = Embedder(settings=embedder_settings)
    onnx_file = export_path(embedder.model_path, embedder_settings.export_root())

    def export_embedder() -> None:
        embedder.load()
        embedder.close()

    return [
        Part(
            "vllm",
            config.venv_dir,
            lambda: (config.venv_dir / localvllm.ENV_MARKER).is_file(),
            lambda: localvllm.ensure_vllm_env(config),
        ),
        Part(
            "model",
            config.model_dir,
            lambda: (config.model_dir / localvllm.MODEL_MARKER).is_file(),
            lambda: localvllm.ensure_model(config),
        ),
        Part(
            "embedder",
            onnx_file,
            onnx_file.is_file,
            export_embedder,
        ),
    ]
