"""ONNX Runtime encoder for the MiniLM sentence embedder.

The model is exported once from the installed sentence-transformers model (with torch's
``torch.export``-based ONNX exporter) into the leangate cache directory, checked against
torch on fixed probe texts, and then loaded by ONNX Runtime without importing torch at all.
The exported graph takes ``input_ids`` and ``attention_mask`` and returns the last hidden
state (``token_embeddings``) and its attention-masked mean (``sentence_embedding``, not
normalised): the same two outputs the sentence-transformers module stack produces.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Bump when the exported graph changes, so cached exports from older code are not reused.
EXPORT_VERSION = 1
INPUTS = ("input_ids", "attention_mask")
OUTPUTS = ("token_embeddings", "sentence_embedding")
# Export-time check against torch: every probe's vector and every token row must agree.
MIN_COSINE = 0.999
PROBES = (
    "How do I reset my password?",
    "hi",
    "Explain the difference between a process and a thread in operating systems, with examples.",
    "Ünïcödé, émojis 🙂 and numbers 3.14159 — mixed!",
)


NOISY_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")


class ExportError(RuntimeError):
    """The model could not be exported to ONNX, or the export does not match torch."""


def export_path(model_path: Path, export_dir: Path) -> Path:
    """Where the export of ``model_path`` lives: keyed by the weights it was made from."""
    weights = model_path / "model.safetensors"
    stat = weights.stat() if weights.is_file() else None
    fingerprint = json.dumps(
        [
            EXPORT_VERSION,
            str(model_path.resolve()),
            stat and stat.st_size,
            stat and stat.st_mtime_ns,
        ]
    )
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    return export_dir / f"{model_path.name}-{digest}" / "model.onnx"


def ensure_export(model_path: Path, export_dir: Path) -> Path:
    """The ONNX file for ``model_path``, exporting (and checking) it first if it is missing.

    The file is written under a temporary name and renamed, so concurrent processes never
    read a partial export; at worst two of them export the same model once each.
    """
    target = export_path(model_path, export_dir)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".export-", suffix=".onnx", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        log.info("exporting the embedding model to ONNX at %s (once)", target)
        _export(model_path, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _export(model_path: Path, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:  # pragma: no cover - both are leangate dependencies
        raise ExportError(f"torch or sentence-transformers missing: {exc}") from exc

    model = SentenceTransformer(str(model_path), device="cpu", local_files_only=True).eval()
    graph = _graph_module(torch, model[0].auto_model)
    features = model.preprocess(list(PROBES[:2]))
    args = tuple(features[name] for name in INPUTS)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    shapes = {name: {0: batch, 1: seq} for name in INPUTS}
    try:
        with warnings.catch_warnings(), _quiet_loggers(), torch.inference_mode(False):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                args,
                str(out),
                input_names=list(INPUTS),
                output_names=list(OUTPUTS),
                dynamic_shapes=shapes,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed: {exc!r}") from exc
    _check_against_torch(out, model_path, model)


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    """The exporter logs every rewrite it makes; keep only its errors."""
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _graph_module(torch: Any, bert: Any) -> Any:
    """The transformer plus mean pooling, as one module with the graph's inputs and outputs."""

    class Graph(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any) -> tuple[Any, Any]:
            hidden = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=torch.zeros_like(input_ids),
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return hidden, pooled

    return Graph().eval()


def _check_against_torch(onnx_file: Path, model_path: Path, model: Any) -> None:
    import torch

    encoder = OnnxEncoder(onnx_file, model_path, threads=1)
    for text in PROBES:
        features = model.preprocess([text])
        with torch.inference_mode():
            expected = model(features)
        states, pooled, _ids, _lengths = encoder.forward([text])
        want_tokens = expected["token_embeddings"].float().numpy()[0]
        want_vector = expected["sentence_embedding"].float().numpy()[0]
        if states.shape[1:] != want_tokens.shape:
            raise ExportError(f"token shape {states.shape[1:]} != {want_tokens.shape}")
        worst = min(
            float(_cosines(pooled, want_vector[None]).min()),
            float(_cosines(states[0], want_tokens).min()),
        )
        if worst < MIN_COSINE:
            raise ExportError(f"ONNX output differs from torch (cosine {worst:.5f}) on {text!r}")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(axis=-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.asarray(num / np.maximum(den, 1e-12))


class OnnxEncoder:
    """Tokenizer (the model's ``tokenizer.json``) plus an ONNX Runtime session, no torch.

    Tokenisation matches sentence-transformers' (same tokenizer, truncated to the model's
    ``max_seq_length``, padded to the longest text of the batch).
    """

    name = "onnx"

    def __init__(
        self,
        onnx_file: Path,
        model_path: Path,
        *,
        threads: int,
        content_mask: Callable[[Sequence[str], set[str]], np.ndarray] | None = None,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(model_path / "tokenizer.json"))
        self.tokenizer.enable_truncation(_max_seq_length(model_path))
        pad = self.tokenizer.token_to_id("[PAD]")
        self.tokenizer.enable_padding(pad_id=0 if pad is None else pad, pad_token="[PAD]")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(onnx_file), options, providers=["CPUExecutionProvider"]
        )
        width = self.session.get_outputs()[1].shape[-1]
        self.dim = width if isinstance(width, int) else -1
        pieces, special = self.pieces()
        self.content = (
            content_mask(pieces, special)
            if content_mask is not None
            else np.ones(len(pieces), dtype=bool)
        )

    def pieces(self) -> tuple[list[str], set[str]]:
        """Every vocabulary piece by id, and the special tokens."""
        size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        pieces = [self.tokenizer.id_to_token(i) or "" for i in range(size)]
        added = self.tokenizer.get_added_tokens_decoder().values()
        return pieces, {token.content for token in added if token.special}

    def forward(self, batch: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(token_states, pooled, ids, lengths)`` for one padded batch."""
        encodings = self.tokenizer.encode_batch(batch)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        states, pooled = self.session.run(list(OUTPUTS), {"input_ids": ids, "attention_mask": mask})
        return states, pooled, ids, mask.sum(axis=1)


def _max_seq_length(model_path: Path) -> int:
    config = model_path / "sentence_bert_config.json"
    if config.is_file():
        return int(json.loads(config.read_text()).get("max_seq_length", 256))
    return 256
