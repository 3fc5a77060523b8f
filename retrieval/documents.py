"""Documents as callers send them: attached to a request, or added to a named corpus."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_DOCUMENT_CHARS = 1_000_000
MAX_ID_CHARS = 256

SPACES = "\\s\x1c-\x1f\x85\ufeff"
"""``\\s`` and what some regex engines count as white space and others do not (Python,
Rust and JSON Schema's ECMA-262 disagree on these), so that pydantic and the OpenAPI
schema's readers accept the same ids."""
DocumentId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_ID_CHARS, pattern=f"^[^{SPACES}#][^#]*$"),
]
"""No leading white space, and no ``#``: a chunk's id is ``<document id>#<position>``."""
MetadataValue = str | int | float | bool | None


class Document(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: DocumentId
    text: str = Field(min_length=1, max_length=MAX_DOCUMENT_CHARS)
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)
