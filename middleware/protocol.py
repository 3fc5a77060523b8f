"""Pydantic models of the OpenAI requests the proxy accepts.

Fields follow the OpenAI API's order. Unknown fields are kept (``extra="allow"``) because
the proxy forwards every field it does not use untouched; validation only rejects what
cannot be a valid request, leaving finer checks to the backend. Known fields are typed
strictly and bounded where nothing beyond could be valid; ``middleware/openapi.py``
serves these models as the routes' OpenAPI schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, StrictBool

from leangate.retrieval.documents import Document

Route = Literal["chat", "completions"]
MAX_DOCUMENTS = 1000
MAX_KEPT_MESSAGES = 10_000
MAX_CHOICES = 128
"""OpenAI's bound on ``n``: every choice is a sequence the backend decodes."""
MAX_ANSWER_TOKENS = 1 << 24
"""Longer than any model's context: a larger ``max_tokens`` is a mistake or an attack."""
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


EXACT_FLOAT_INTEGERS = 2**53
"""Past this a float may stand for several integers: orjson parses an integer beyond 64
bits as a float, and ``-(2**63) - 1`` would round into the bounds it broke."""


def _integral(value: object) -> object:
    """``2.0`` as ``2``: JSON has one kind of number, and JSON Schema (like OpenAI) takes
    a number without a fraction for an integer. A float too large to be exact stays a
    float, so the strict integer fields reject it."""
    if isinstance(value, float) and value.is_integer() and abs(value) < EXACT_FLOAT_INTEGERS:
        return int(value)
    return value


Number = Annotated[float, Strict()]
"""Numbers, booleans and strings are not coerced into each other: the proxy reads these
fields itself (``"stream": "false"`` is not false to ``bool()``), and forwards the body
as it came, so it must not understand a field otherwise than a strict backend would."""
AsInteger = BeforeValidator(_integral)
AnswerTokens = Annotated[int, Strict(), Field(ge=0, le=MAX_ANSWER_TOKENS), AsInteger]
Count = Annotated[int, Strict(), Field(ge=0, le=INT32_MAX), AsInteger]
TokenId = Count


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessage(_Open):
    role: str
    content: str | list[Any] | None = None
    name: str | None = None


class StreamOptions(_Open):
    include_usage: StrictBool | None = None


class _Sampling(_Open):
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    max_tokens: AnswerTokens | None = None
    n: Annotated[int, Strict(), Field(ge=1, le=MAX_CHOICES), AsInteger] | None = None
    presence_penalty: Number | None = None
    seed: Annotated[int, Strict(), Field(ge=INT64_MIN, le=INT64_MAX), AsInteger] | None = None
    stop: str | list[str] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Strict(), Field(ge=0)] | None = None
    top_p: Number | None = None
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    logprobs: StrictBool | None = None
    top_logprobs: Count | None = None
    max_completion_tokens: AnswerTokens | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    model: str
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    )
    echo: StrictBool | None = None
    logprobs: Count | None = None
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
    cache_ttl_s: Annotated[float, Strict()] | None = Field(None, gt=0, allow_inf_nan=False)
    """Store this answer for at most this long."""
    documents: list[Document] | None = Field(None, max_length=MAX_DOCUMENTS)
    """Context for the ``rag`` stage, which sends the model the parts that answer the
    question (ignored when the policy runs no ``rag`` stage)."""
    planner: Literal["sot", "decompose", "direct"] | None = None
    """Force how the answer is planned, among the planner stages the policy runs for this
    request: ``sot`` or ``decompose`` runs that stage without its router; ``direct`` skips
    both. A planner the policy sets to ``never`` (or does not run) stays off."""
    citations: StrictBool = False
    """Name the chunks the ``rag`` stage chose in a ``leangate`` field of the JSON body
    (the ``x-leangate-citations`` header names them always)."""
    keep_messages: list[Count] | None = Field(None, max_length=MAX_KEPT_MESSAGES)
    """Indexes (from 0) of ``messages`` that the ``compress`` stage must send exactly as
    given: never compressed or summarized."""

    def answer_inputs(self) -> dict[str, Any] | None:
        """What in these options changes the answer, for cache keys."""
        if (
            not self.documents
            and not self.citations
            and self.planner is None
            and not self.keep_messages
        ):
            return None
        inputs: dict[str, Any] = {
            "documents": [d.model_dump() for d in self.documents or []],
            "citations": self.citations,
            "planner": self.planner,
        }
        if self.keep_messages:  # only when set: other requests' keys stay as they were
            inputs["keep_messages"] = sorted(set(self.keep_messages))
        return inputs


REQUEST_MODELS: dict[Route, type[ChatCompletionRequest] | type[CompletionRequest]] = {
    "chat": ChatCompletionRequest,
    "completions": CompletionRequest,
}
ROUTE_PATHS: dict[Route, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
