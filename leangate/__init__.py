"""leangate: prompt- and output-level optimization middleware for OpenAI-compatible servers.

The SDK's names are imported on first use (``leangate.Pipeline`` loads the stages'
machinery, ``leangate.Options`` only pydantic models), so ``import leangate`` costs
nothing. See README, "Python SDK".
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from leangate.admin_client import (
        AddedDocuments,
        AdminClient,
        AdminError,
        CorpusInfo,
        Health,
        QueryHit,
    )
    from leangate.middleware.policy import Policy, PolicyError
    from leangate.middleware.protocol import RequestOptions as Options
    from leangate.retrieval.documents import Document
    from leangate.sdk.pipeline import Pipeline, RawResponse
    from leangate.sdk.policies import check_policy
    from leangate.sdk.streams import ChunkStream
    from leangate.sdk.sync import SyncChunkStream, SyncPipeline

__version__ = "0.1.0"

_EXPORTS = {
    "Pipeline": ("leangate.sdk.pipeline", "Pipeline"),
    "SyncPipeline": ("leangate.sdk.sync", "SyncPipeline"),
    "ChunkStream": ("leangate.sdk.streams", "ChunkStream"),
    "SyncChunkStream": ("leangate.sdk.sync", "SyncChunkStream"),
    "RawResponse": ("leangate.sdk.pipeline", "RawResponse"),
    "Options": ("leangate.middleware.protocol", "RequestOptions"),
    "Document": ("leangate.retrieval.documents", "Document"),
    "Policy": ("leangate.middleware.policy", "Policy"),
    "PolicyError": ("leangate.middleware.policy", "PolicyError"),
    "check_policy": ("leangate.sdk.policies", "check_policy"),
    "AdminClient": ("leangate.admin_client", "AdminClient"),
    "AdminError": ("leangate.admin_client", "AdminError"),
    "CorpusInfo": ("leangate.admin_client", "CorpusInfo"),
    "AddedDocuments": ("leangate.admin_client", "AddedDocuments"),
    "QueryHit": ("leangate.admin_client", "QueryHit"),
    "Health": ("leangate.admin_client", "Health"),
}

__all__ = [
    "AddedDocuments",
    "AdminClient",
    "AdminError",
    "ChunkStream",
    "CorpusInfo",
    "Document",
    "Health",
    "Options",
    "Pipeline",
    "Policy",
    "PolicyError",
    "QueryHit",
    "RawResponse",
    "SyncChunkStream",
    "SyncPipeline",
    "__version__",
    "check_policy",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'leangate' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
