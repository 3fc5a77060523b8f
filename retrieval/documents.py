"""Documents as callers send them: attached to a request, or added to a named corpus."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_DOCUMENT_CHARS = 1_000_000
MAX_ID_CHARS = 256

DocumentId = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS, pattern=r"^[^\s#][^#]*$")
]
"""No ``#``: a chunk's id is ``<document id>#<position>``."""
MetadataValue = str | int | float | bool | None


class Document(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: DocumentId
    text: str = Field(min_length=1, max_length=MAX_DOCUMENT_CHARS)
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)
