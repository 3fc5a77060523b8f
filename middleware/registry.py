"""The table from stage name (as a policy writes it) to the class that implements it.

Classes are named by import string and imported only when a policy uses them, so that a
stage's heavy dependencies (an embedding model, faiss) cost nothing to proxies that never
run it.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from pydantic import BaseModel

from leangate.middleware.pipeline import Stage
from leangate.middleware.services import Services

STAGES: dict[str, str] = {
    "passthrough": "leangate.middleware.stages:PassThrough",
    "cache": "leangate.cache.stage:CacheStage",
}


class StageClass(Protocol):
    """What a stage class offers the registry: a settings model, a default budget, and a
    constructor that builds the stage from validated settings and the shared services."""

    Settings: type[BaseModel]
    default_budget_ms: float | None

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
    """The class registered under ``name``; a ``ValueError`` names the known stages."""
    if name not in STAGES:
        known = ", ".join(sorted(STAGES))
        raise ValueError(f"unknown stage {name!r}; known stages: {known}")
    cls: StageClass = import_from_string(STAGES[name])
    return cls
