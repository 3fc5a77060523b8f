"""The corpus routes: ``/v1/corpora`` (see README, "Corpora").

The tenant comes from the bearer key exactly as for completions (the policy's
``tenant_for_key``), and every call passes it to ``Corpora``, which scopes all it stores
by it: a route cannot name another tenant's corpus. A document id already in the corpus is
a conflict (409); a body over the size limit, or documents holding more characters than
``LEANGATE_CORPUS_MAX_BATCH_CHARS``, a 413; every other bad input is a 400. A refused
request leaves the corpus as it was.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import orjson
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from leangate.middleware.errors import (
    InvalidRequest,
    PayloadTooLarge,
    ProxyError,
    describe_validation_error,
    error_response,
)
from leangate.middleware.gateway import Gateway
from leangate.middleware.protocol import AsInteger
from leangate.retrieval.corpora import Corpora, CorpusSettings, DuplicateDocument, UnknownCorpus
from leangate.retrieval.documents import MAX_DOCUMENT_CHARS, MAX_ID_CHARS, Document
from leangate.settings import Settings

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
MAX_QUERY_CHARS = 4000
MAX_TOP_K = 100
MAX_BATCH = int(CorpusSettings.model_fields["max_documents_per_request"].default)
MAX_DELETE_IDS = 10_000


class IngestSettings(BaseSettings):
    """Bounds of one ingest request (``LEANGATE_CORPUS_*``), read when the app is made.

    Ingesting costs the embedder's time for every chunk, so its characters, not its
    documents, are what to bound: a body within the 4 MiB default could hold four
    documents of a million characters each, about 10,000 chunks to embed (a million
    characters of prose: 2,490 chunks, 23 s on 2 cores).
    """

    model_config = SettingsConfigDict(env_prefix="LEANGATE_CORPUS_", extra="ignore")

    max_batch_chars: int = Field(MAX_DOCUMENT_CHARS, gt=0)
    """Most characters of text (all documents' ``text`` together) in one request; by
    default one document of the largest size."""


class AddRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    documents: list[Document] = Field(min_length=1, max_length=MAX_BATCH)

    @field_validator("documents", mode="before")
    @classmethod
    def _few_enough(cls, documents: object) -> object:
        """Counted before any document is validated: ``max_length`` counts only after
        validating every one, which holds the event loop for seconds for a million."""
        if isinstance(documents, list) and len(documents) > MAX_BATCH:
            raise ValueError(f"{len(documents)} documents in one request; at most {MAX_BATCH}")
        return documents


class DeleteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]] = Field(
        min_length=1, max_length=MAX_DELETE_IDS
    )


class QueryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    top_k: Annotated[int, Strict(), Field(ge=1, le=MAX_TOP_K), AsInteger] = 5
    dense_weight: Annotated[float, Strict(), Field(ge=0.0, le=1.0)] = 0.5


class UnknownCorpusError(ProxyError):
    status_code = 404
    error_type = "not_found"
    code = "corpus_not_found"


class Conflict(ProxyError):
    status_code = 409
    code = "duplicate_document"


class Unavailable(ProxyError):
    status_code = 503
    error_type = "service_unavailable"
    code = "corpora_unavailable"


_Route = Callable[[Corpora, str], Awaitable[Response]]


def add_corpus_routes(app: FastAPI) -> None:
    app.state.ingest = IngestSettings()
    app.add_route("/v1/corpora", _list, methods=["GET"])
    app.add_route("/v1/corpora/{name}", _drop, methods=["DELETE"])
    app.add_route("/v1/corpora/{name}/documents", _add, methods=["POST"])
    app.add_route("/v1/corpora/{name}/documents", _delete, methods=["DELETE"])
    app.add_route("/v1/corpora/{name}/documents/delete", _delete, methods=["POST"])
    app.add_route("/v1/corpora/{name}/query", _query, methods=["POST"])


async def _list(request: Request) -> Response:
    async def run(corpora: Corpora, tenant: str) -> Response:
        infos = await corpora.corpora(tenant)
        data = [{"name": i.name, "documents": i.documents, "chunks": i.chunks} for i in infos]
        return JSONResponse({"object": "list", "data": data})

    return await _handle(request, run)


async def _drop(request: Request) -> Response:
    async def run(corpora: Corpora, tenant: str) -> Response:
        name = request.path_params["name"]
        if not await corpora.drop(tenant, name):
            raise UnknownCorpus(name)
        return JSONResponse({"deleted": True})

    return await _handle(request, run)


async def _add(request: Request) -> Response:
    async def run(corpora: Corpora, tenant: str) -> Response:
        name = request.path_params["name"]
        data = _json(await _body(request))
        ingest: IngestSettings = request.app.state.ingest
        _check_characters(data, ingest.max_batch_chars)
        body = _validate(AddRequest, data)
        added = await corpora.add(tenant, name, body.documents)
        return JSONResponse({"corpus": name, "documents": added.documents, "chunks": added.chunks})

    return await _handle(request, run)


async def _delete(request: Request) -> Response:
    async def run(corpora: Corpora, tenant: str) -> Response:
        body = _parse(DeleteRequest, await _body(request))
        deleted = await corpora.delete_documents(tenant, request.path_params["name"], body.ids)
        return JSONResponse({"deleted": deleted})

    return await _handle(request, run)


async def _query(request: Request) -> Response:
    async def run(corpora: Corpora, tenant: str) -> Response:
        name = request.path_params["name"]
        body = _parse(QueryRequest, await _body(request))
        vector = (await corpora.embedder.aembed([body.query]))[0]
        hits = await corpora.search(
            tenant, name, body.query, vector, body.top_k, dense_weight=body.dense_weight
        )
        data = [
            {
                "id": h.chunk.id,
                "document": h.chunk.doc_id,
                "title": h.chunk.title,
                "text": h.chunk.text,
                "score": h.score,
                "metadata": dict(h.chunk.metadata),
            }
            for h in hits
        ]
        return JSONResponse({"object": "list", "corpus": name, "data": data})

    return await _handle(request, run)


# --- shared ----------------------------------------------------------------------------------


async def _handle(request: Request, run: _Route) -> Response:
    """Resolve the tenant, run the route, and turn failures into OpenAI-style errors."""
    gateway: Gateway = request.app.state.gateway
    corpora = gateway.services.corpora
    try:
        if corpora is None:
            raise Unavailable("corpora are not available on this proxy")
        return await run(corpora, await gateway.tenant_for(request.headers))
    except UnknownCorpus as exc:
        return error_response(UnknownCorpusError(str(exc)))
    except DuplicateDocument as exc:
        error = Conflict(str(exc)) if exc.stored else InvalidRequest(str(exc))
        return error_response(error)
    except ValueError as exc:
        return error_response(InvalidRequest(str(exc)))
    except (RedisError, sqlite3.Error, OSError) as exc:
        log.warning("corpus store failed: %r", exc)
        return error_response(Unavailable("the corpus store is unavailable; try again later"))
    except ProxyError as exc:
        return error_response(exc)


async def _body(request: Request) -> bytes:
    settings: Settings = request.app.state.settings
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(model: type[M], body: bytes) -> M:
    return _validate(model, _json(body))


def _json(body: bytes) -> object:
    """The body's JSON. Parsed by orjson, not by pydantic: pydantic's own JSON parsing is
    four times slower on a large batch, and a batch over a limit should cost little."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"could not parse the JSON body: {exc}", code="invalid_json") from None


def _validate(model: type[M], data: object) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None


def _check_characters(data: object, limit: int) -> None:
    """Refuse (413) documents whose texts hold more than ``limit`` characters together,
    before any is validated. A body that is not a batch of documents, or has too many
    of them, is left to validation's 400."""
    documents = data.get("documents") if isinstance(data, dict) else None
    if not isinstance(documents, list) or len(documents) > MAX_BATCH:
        return
    total = sum(
        len(text)
        for document in documents
        if isinstance(document, dict) and isinstance(text := document.get("text"), str)
    )
    if total > limit:
        raise PayloadTooLarge(
            f"the documents hold {total} characters of text; at most {limit} in one request",
            code="too_many_characters",
        )
