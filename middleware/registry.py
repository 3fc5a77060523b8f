"""From stage name (as a policy writes it) to the class that implements it.

Stages are found through the ``leangate.stages`` entry-point group, so a package ships a
stage by declaring it in its own metadata, without editing leangate::

    [project.entry-points."leangate.stages"]
    redact = "mypackage.redact:RedactStage"

leangate's own stages are declared the same way in its ``pyproject.toml``; ``BUILTIN``
repeats them for a source tree that was never installed. Classes are imported only when a
policy uses them, so a stage's heavy dependencies (an embedding model, faiss) cost nothing
to proxies that never run it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
from collections.abc import Iterable
from typing import Any, Protocol

from pydantic import BaseModel

from leangate.middleware.pipeline import Stage
from leangate.middleware.services import Services

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "leangate.stages"
BUILTIN: dict[str, str] = {
    "passthrough": "leangate.middleware.stages:PassThrough",
    "example-fanout": "leangate.middleware.stages:ExampleFanout",
    "cache": "leangate.cache.stage:CacheStage",
    "sot": "leangate.planners.sot:SotStage",
    "compress": "leangate.retrieval.compress:CompressStage",
    "rag": "leangate.retrieval.rag:RagStage",
    "prune": "leangate.retrieval.prune:PruneStage",
    "decompose": "leangate.planners.decompose:DecomposeStage",
}


@functools.cache
def known_stages() -> dict[str, str]:
    """Every stage name with its import string: the built-in ones, then entry points
    (which may not shadow a built-in name)."""
    table = dict(BUILTIN)
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in BUILTIN and entry.value != BUILTIN[entry.name]:
            log.warning(
                "ignoring stage entry point %s=%s: the name is built in", entry.name, entry.value
            )
            continue
        table[entry.name] = entry.value
    return table


class StageClass(Protocol):
    """What a stage class offers the registry: a settings model, a default budget, and a
    constructor that builds the stage from validated settings and the shared services."""

    Settings: type[BaseModel]
    default_budget_ms: float | None
    # Optionally ``needs: ClassVar[frozenset[str]]``: shared services to open before the
    # first request ("embedder", "profile", "tokenizer"); see ``Services.prepare``.

    def __call__(self, name: str, settings: Any, services: Services) -> Stage: ...


def import_from_string(target: str) -> Any:
    """Import ``"package.module:attribute"``."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ImportError(f'import string "{target}" must look like "module:attribute"')
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attribute)
    except AttributeError as exc:
        raise ImportError(f'module "{module_name}" has no attribute "{attribute}"') from exc


def stage_class(name: str) -> StageClass:
    """The class registered under ``name``, or named by an import string
    (``"package.module:Class"``); a ``ValueError`` names the known stages."""
    stages = known_stages()
    if name not in stages and ":" in name:
        try:
            found: StageClass = import_from_string(name)
        except ImportError as exc:
            raise ValueError(f"stage {name!r} cannot be imported: {exc}") from exc
        return found
    if name not in stages:
        known = ", ".join(sorted(stages))
        raise ValueError(f"unknown stage {name!r}; known stages: {known}")
    cls: StageClass = import_from_string(stages[name])
    return cls


def needs_of(specs: Iterable[tuple[str, BaseModel]]) -> set[str]:
    """The shared services that stages, with these settings, need opened at start-up: a
    stage class declares them as ``needs`` or, when they depend on its settings, with a
    ``needs_for(settings)`` class method."""
    needs: set[str] = set()
    for name, settings in specs:
        cls = stage_class(name)
        needs_for = getattr(cls, "needs_for", None)
        needs |= set(needs_for(settings) if needs_for else getattr(cls, "needs", ()))
    return needs
