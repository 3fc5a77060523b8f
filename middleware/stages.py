"""Stages that belong to the pipeline itself rather than to a capability."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from leangate.middleware.context import RequestContext, Result
from leangate.middleware.pipeline import Handler
from leangate.middleware.services import Services


class PassThrough:
    """Does nothing but call the rest of the chain: the pipeline's own test stage."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

    default_budget_ms: ClassVar[float | None] = 5.0

    def __init__(self, name: str, settings: Settings, services: Services) -> None:
        self.name = name

    async def __call__(self, ctx: RequestContext, call_next: Handler) -> Result:
        return await call_next(ctx)
