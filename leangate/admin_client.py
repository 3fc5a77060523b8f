"""``leangate.AdminClient``: a running proxy's own APIs (corpora, cache purge, health).

Synchronous, on httpx: these calls are rare and administrative (ingest a corpus from a
script, purge a tenant's cache from a job), the CLI makes them the same way, and an async
app can run one in a thread (``await asyncio.to_thread(admin.list_corpora)``) without the
SDK owning a second client and event loop. Completions go through the openai client or
``leangate.Pipeline``, not here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict

from leangate.retrieval.documents import Document, MetadataValue


class AdminError(Exception):
    """A call the proxy refused or could not answer.

    ``status`` is the HTTP status (``None``: the proxy could not be reached); ``type`` and
    ``code`` are those of the proxy's ``{"error": {...}}`` body, when it sent one.
    """

    def __init__(
        self, status: int | None, message: str, type: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(f"{status}: {message}" if status is not None else message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class CorpusInfo(_Reply):
    name: str
    documents: int
    chunks: int


class AddedDocuments(_Reply):
    corpus: str
    documents: int
    chunks: int


class QueryHit(_Reply):
    id: str
    """The chunk's id, ``<document id>#<position>``."""
    document: str
    title: str | None = None
    text: str
    score: float
    metadata: dict[str, MetadataValue] = {}


class Health(_Reply):
    status: str
    """``ok`` once a backend replica is healthy, else ``unavailable``."""
    replicas_healthy: int
    replicas: int | list[dict[str, Any]]
    """A count, or each replica's state when the client holds the admin key."""
    cache: dict[str, Any]


class CacheStats(_Reply):
    store: str
    """``redis`` or ``memory``."""
    entries: dict[str, int]
    """``answers`` and ``semantic`` entries stored."""
    lookups: dict[str, int]
    """This proxy's lookups since it started: ``exact-hit``, ``exact-miss``, ``semantic-hit``..."""


class ApiKey(_Reply):
    sha256: str
    tenant: str
    api_key: str | None = None
    """The key itself: only in ``create_key``'s answer, never again."""


class AdminClient:
    """``with AdminClient("http://127.0.0.1:8080", api_key="sk-...") as admin:``

    ``api_key`` is the tenant's key (corpora are per tenant, as completions are);
    ``admin_key`` is the proxy's ``LEANGATE_ADMIN_API_KEY``, needed to purge the cache, to
    manage API keys and to see each replica in ``health()``.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8080",
        *,
        api_key: str | None = None,
        admin_key: str | None = None,
        timeout: float = 600.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._admin_key = admin_key
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- corpora ---------------------------------------------------------------------------

    def add_documents(
        self, corpus: str, documents: Sequence[Document | Mapping[str, Any]]
    ) -> AddedDocuments:
        """Chunk, embed and index up to 256 new documents; an id already stored is a 409
        and the whole batch is refused."""
        body = {"documents": [_document(d) for d in documents]}
        reply = self._call("POST", f"/v1/corpora/{corpus}/documents", json=body)
        return AddedDocuments.model_validate(reply)

    def delete_documents(self, corpus: str, ids: Sequence[str]) -> int:
        """Remove documents by id; the number deleted."""
        reply = self._call("POST", f"/v1/corpora/{corpus}/documents/delete", json={"ids": ids})
        return int(reply["deleted"])

    def list_corpora(self) -> list[CorpusInfo]:
        reply = self._call("GET", "/v1/corpora")
        return [CorpusInfo.model_validate(item) for item in reply["data"]]

    def drop_corpus(self, corpus: str) -> None:
        """Delete the corpus and everything in it (an unknown corpus is a 404)."""
        self._call("DELETE", f"/v1/corpora/{corpus}")

    def query(
        self, corpus: str, query: str, *, top_k: int = 5, dense_weight: float = 0.5
    ) -> list[QueryHit]:
        """The corpus's best chunks for ``query`` (hybrid dense and BM25 search)."""
        body = {"query": query, "top_k": top_k, "dense_weight": dense_weight}
        reply = self._call("POST", f"/v1/corpora/{corpus}/query", json=body)
        return [QueryHit.model_validate(hit) for hit in reply["data"]]

    # --- operations ------------------------------------------------------------------------

    def purge_cache(self, *, tenant: str | None = None, namespace: str | None = None) -> int:
        """Delete cached answers of a tenant and/or namespace; the number deleted."""
        body = {"tenant": tenant, "namespace": namespace}
        reply = self._call("POST", "/admin/cache/purge", json=body, admin=True)
        return int(reply["deleted"])

    def cache_stats(self, *, tenant: str | None = None, namespace: str | None = None) -> CacheStats:
        """Entries the cache holds (of a tenant and/or namespace) and the lookups the
        proxy answered since it started."""
        params = {k: v for k, v in (("tenant", tenant), ("namespace", namespace)) if v}
        reply = self._call("GET", "/admin/cache/stats", params=params, admin=True)
        return CacheStats.model_validate(reply)

    def create_key(self, tenant: str) -> ApiKey:
        """A new API key for ``tenant``, kept in the proxy's Redis (its only sight)."""
        reply = self._call("POST", "/admin/keys", json={"tenant": tenant}, admin=True, ok=(201,))
        return ApiKey.model_validate(reply)

    def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        """The digests of the keys kept in Redis, with their tenants."""
        params = {"tenant": tenant} if tenant else None
        reply = self._call("GET", "/admin/keys", params=params, admin=True)
        return [ApiKey.model_validate(key) for key in reply["data"]]

    def revoke_key(self, sha256: str) -> None:
        """Revoke a key kept in Redis (every replica refuses it within 2 s)."""
        self._call("DELETE", f"/admin/keys/{sha256}", admin=True)

    def health(self) -> Health:
        """The proxy's health; an unavailable backend is a ``status``, not an error."""
        reply = self._call("GET", "/health", admin=self._admin_key is not None, ok=(200, 503))
        return Health.model_validate(reply)

    def _call(
        self,
        method: str,
        path: str,
        *,
        json: object = None,
        params: dict[str, str] | None = None,
        admin: bool = False,
        ok: tuple[int, ...] = (200,),
    ) -> Any:
        key = self._admin_key if admin else None
        headers = {"authorization": f"Bearer {key}"} if key else None
        try:
            response = self._http.request(method, path, json=json, params=params, headers=headers)
        except httpx.HTTPError as exc:
            raise AdminError(None, f"{method} {path}: {exc}") from exc
        if response.status_code not in ok:
            raise _error(response)
        return response.json()


def _document(document: Document | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(document, Document):
        return document.model_dump(mode="json")
    return Document.model_validate(document).model_dump(mode="json")


def _error(response: httpx.Response) -> AdminError:
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return AdminError(response.status_code, response.text or response.reason_phrase)
    code = error.get("code")
    return AdminError(
        response.status_code,
        str(error.get("message", "")),
        error.get("type"),
        None if code is None else str(code),
    )
