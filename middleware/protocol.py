"""Pydantic models of the OpenAI requests the proxy accepts.

Fields follow the OpenAI API's order. Unknown fields are kept (``extra="allow"``) because
the proxy forwards every field it does not use untouched; validation only rejects what
cannot be a valid request, leaving finer checks to the backend.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from leangate.retrieval.documents import Document

Route = Literal["chat", "completions"]
MAX_DOCUMENTS = 1000


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessage(_Open):
    role: str
    content: str | list[Any] | None = None
    name: str | None = None


class StreamOptions(_Open):
    include_usage: bool | None = None


class _Sampling(_Open):
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = Field(None, ge=0)
    n: int | None = Field(None, ge=1)
    presence_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = None
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    logprobs: bool | None = None
    top_logprobs: int | None = None
    max_completion_tokens: int | None = Field(None, ge=0)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None


class RequestOptions(BaseModel):
    """What a caller may say about leangate itself, in the ``leangate`` body field.

    Options can only narrow what the policy allows: a stage the policy does not run for
    this request cannot be switched on from here.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    stages: list[str] | None = None
    """Run only these of the policy's stages (``[]`` runs none)."""
    disable: list[str] = Field(default_factory=list)
    """Skip these of the policy's stages."""
    cache_ttl_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    """Store this answer for at most this long."""
    documents: list[Document] | None = Field(None, max_length=MAX_DOCUMENTS)
    """Context for the ``rag`` stage, which sends the model the parts that answer the
    question (ignored when the policy runs no ``rag`` stage)."""
    planner: Literal["sot", "decompose", "direct"] | None = None
    """Force how the answer is planned, among the planner stages the policy runs for this
    request: ``sot`` or ``decompose`` runs that stage without its router; ``direct`` skips
    both. A planner the policy sets to ``never`` (or does not run) stays off."""
    citations: bool = False
    """Name the chunks the ``rag`` stage chose in a ``leangate`` field of the JSON body
    (the ``x-leangate-citations`` header names them always)."""

    def answer_inputs(self) -> dict[str, Any] | None:
        """What in these options changes the answer, for cache keys."""
        if not self.documents and not self.citations and self.planner is None:
            return None
        return {
            "documents": [d.model_dump() for d in self.documents or []],
            "citations": self.citations,
            "planner": self.planner,
        }


REQUEST_MODELS: dict[Route, type[ChatCompletionRequest] | type[CompletionRequest]] = {
    "chat": ChatCompletionRequest,
    "completions": CompletionRequest,
}
ROUTE_PATHS: dict[Route, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
