"""Embedder tests (real offline MiniLM, CPU): both runtimes, their parity, and coalescing."""

from __future__ import annotations

import asyncio
import functools
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from leangate.cache import _onnx
from leangate.cache.embedder import (
    EMBEDDING_DIM,
    MAX_TOKENS,
    Embedder,
    EmbedderSettings,
    Embedding,
    default_model_path,
)
from leangate.cache.semantic import Entry
from leangate.cache.semantic_eval import default_data_dir, load_gptcache_pairs

# Texts of my own for the parity check: short, long (truncated at 256 tokens), non-ASCII,
# stopword-only, punctuation-only and empty.
FIXED = [
    "How do I install Python 3.11 on Ubuntu?",
    "What's the capital of Australia",
    "the of and",
    "?",
    "",
    "Größenordnung, naïve café — 東京 in März? 🙂",
    "Compare merge sort and quicksort on nearly sorted input, with their worst cases. " * 30,
]
MIN_COSINE = 0.999


@pytest.fixture(scope="session")
def embedder() -> Iterator[Embedder]:
    model = Embedder()
    model.load()
    yield model
    model.close()


@pytest.fixture(scope="session")
def torch_embedder() -> Embedder:
    model = Embedder(settings=EmbedderSettings(backend="torch"))
    model.load()
    return model


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float32), b.astype(np.float32)
    num = (a * b).sum(axis=-1)
    return np.asarray(num / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)))


def assert_same_embeddings(got: list[Embedding], want: list[Embedding], texts: list[str]) -> None:
    for text, g, w in zip(texts, got, want, strict=True):
        assert float(cosines(g.vector, w.vector)) >= MIN_COSINE, text
        assert g.tokens is not None and w.tokens is not None
        assert g.tokens.shape == w.tokens.shape, text
        assert cosines(g.tokens, w.tokens).min() >= MIN_COSINE, text


# --- loading ------------------------------------------------------------------------------


def test_default_model_path_points_at_shipped_model() -> None:
    path = default_model_path()
    assert (path / "modules.json").is_file()
    assert (path / "model.safetensors").is_file()


def test_constructor_does_not_load() -> None:
    lazy = Embedder()
    assert not lazy.loaded
    assert lazy.backend is None
    assert lazy.dim == EMBEDDING_DIM


def test_onnx_runtime_is_the_default(embedder: Embedder) -> None:
    assert embedder.backend == "onnx"
    export = _onnx.export_path(embedder.model_path, embedder.settings.export_root())
    assert export.is_file()


def test_load_is_idempotent(embedder: Embedder) -> None:
    encoder = embedder._encoder
    embedder.load()
    assert embedder._encoder is encoder


def test_the_export_is_reused_not_redone(
    embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_export(model_path: Path, out: Path) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(_onnx, "_export", no_export)
    again = Embedder(settings=EmbedderSettings(backend="onnx"))
    again.load()
    assert again.backend == "onnx"


def test_onnx_runs_without_torch() -> None:
    """Once exported, the ONNX path never imports torch (hundreds of MB per process)."""
    code = (
        "import sys\n"
        "from leangate.cache.embedder import Embedder, EmbedderSettings\n"
        "e = Embedder(settings=EmbedderSettings(backend='onnx'))\n"
        "e.encode(['hello world'])\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    Embedder().load()  # make sure the export exists
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --- fallback to torch --------------------------------------------------------------------


def test_falls_back_to_torch_without_onnxruntime(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    model = Embedder(settings=EmbedderSettings(export_dir=tmp_path))
    with caplog.at_level(logging.WARNING, logger="leangate.cache.embedder"):
        model.load()
    assert model.backend == "torch"
    assert "onnxruntime" in caplog.text
    assert list(tmp_path.iterdir()) == []  # no export attempted
    assert model.embed(["still works"]).shape == (1, EMBEDDING_DIM)


def test_falls_back_to_torch_when_the_export_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    def broken_export(model_path: Path, out: Path) -> None:
        out.write_bytes(b"half a model")
        raise _onnx.ExportError("exporter crashed")

    monkeypatch.setattr(_onnx, "_export", broken_export)
    model = Embedder(settings=EmbedderSettings(export_dir=tmp_path))
    with caplog.at_level(logging.WARNING, logger="leangate.cache.embedder"):
        model.load()
    assert model.backend == "torch"
    assert "exporter crashed" in caplog.text
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no partial file left


def test_onnx_only_raises_instead_of_falling_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    model = Embedder(settings=EmbedderSettings(backend="onnx", export_dir=tmp_path))
    with pytest.raises(ImportError):
        model.load()
    assert not model.loaded


def test_export_check_rejects_outputs_that_differ_from_torch(
    embedder: Embedder, torch_embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    export = _onnx.export_path(embedder.model_path, embedder.settings.export_root())
    st_model = torch_embedder._encoder.model  # type: ignore[union-attr]
    _onnx._check_against_torch(export, embedder.model_path, st_model)
    monkeypatch.setattr(_onnx, "MIN_COSINE", 1.0001)  # no real pair of vectors reaches it
    with pytest.raises(_onnx.ExportError, match="differs from torch"):
        _onnx._check_against_torch(export, embedder.model_path, st_model)


# --- parity: ONNX Runtime against torch ---------------------------------------------------


def test_onnx_matches_torch_on_fixed_texts(embedder: Embedder, torch_embedder: Embedder) -> None:
    assert_same_embeddings(embedder.encode(FIXED), torch_embedder.encode(FIXED), FIXED)
    for text in FIXED:  # one by one too: no padding at all
        assert_same_embeddings(embedder.encode([text]), torch_embedder.encode([text]), [text])


def test_onnx_matches_torch_on_200_questions(embedder: Embedder, torch_embedder: Embedder) -> None:
    path = default_data_dir() / "gptcache" / "mock_data.json"
    if not path.is_file():
        pytest.skip(f"public data not found at {path}")
    pairs = load_gptcache_pairs(path)[:100]
    texts = [t for p in pairs for t in (p.origin, p.similar)]
    assert_same_embeddings(embedder.encode(texts), torch_embedder.encode(texts), texts)


# --- behaviour shared by both runtimes ----------------------------------------------------


@pytest.fixture(params=["onnx", "torch"])
def any_embedder(
    request: pytest.FixtureRequest, embedder: Embedder, torch_embedder: Embedder
) -> Embedder:
    return embedder if request.param == "onnx" else torch_embedder


def test_embed_shape_dtype_and_norm(any_embedder: Embedder) -> None:
    vectors = any_embedder.embed(["How do I bake bread?", "A much longer sentence " * 20, "x"])
    assert vectors.shape == (3, EMBEDDING_DIM)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_embed_empty_and_str_rejected(any_embedder: Embedder) -> None:
    assert any_embedder.embed([]).shape == (0, EMBEDDING_DIM)
    with pytest.raises(TypeError):
        any_embedder.embed("not a list")


def test_batch_order_and_values_match_single(any_embedder: Embedder) -> None:
    texts = ["a long sentence about the weather in Paris today", "hi", "medium length text"]
    batch = any_embedder.embed(texts)
    for i, text in enumerate(texts):
        np.testing.assert_allclose(batch[i], any_embedder.embed([text])[0], atol=1e-5)


def test_large_requests_are_split_into_passes_of_max_batch() -> None:
    model = Embedder(settings=EmbedderSettings(max_batch=4))
    texts = [f"question number {i} about topic {i % 3}" for i in range(10)]
    vectors = model.embed(texts)
    assert model.forward_passes == 3
    np.testing.assert_allclose(vectors[7], model.embed([texts[7]])[0], atol=1e-5)


def test_paraphrase_closer_than_unrelated(any_embedder: Embedder) -> None:
    a, b, c = any_embedder.embed(
        ["How can I reset my password?", "How do I change my password?", "Best pizza in Rome"]
    )
    assert float(a @ b) > float(a @ c) + 0.3


def test_encode_matches_embed_and_keeps_content_tokens(any_embedder: Embedder) -> None:
    texts = ["How do I install Python 3.11 on Ubuntu?", "the of and", "?"]
    encoded = any_embedder.encode(texts)
    np.testing.assert_allclose(
        np.stack([e.vector for e in encoded]), any_embedder.embed(texts), atol=1e-5
    )
    for e in encoded:
        assert e.tokens is not None
        assert e.tokens.dtype == np.float16
        assert e.tokens.shape[0] >= 1
        assert e.tokens.shape[1] == EMBEDDING_DIM
        np.testing.assert_allclose(np.linalg.norm(e.tokens.astype(np.float32), axis=1), 1, 1e-2)
    # install, python, 3, 11, ubuntu: stopwords and punctuation are dropped
    first = encoded[0].tokens
    assert first is not None and 4 <= first.shape[0] <= 8
    assert any_embedder.encode([]) == []
    with pytest.raises(TypeError):
        any_embedder.encode("not a list")


def test_encode_caps_tokens(any_embedder: Embedder) -> None:
    [long] = any_embedder.encode(["alpha beta gamma delta " * 60])
    assert long.tokens is not None and long.tokens.shape[0] == MAX_TOKENS


def test_single_query_latency(embedder: Embedder) -> None:
    query = ["How do I install Python 3.11 on Ubuntu?"]
    for _ in range(3):
        embedder.embed(query)
    times = []
    for _ in range(15):
        start = time.perf_counter()
        embedder.embed(query)
        times.append(time.perf_counter() - start)
    # Generous bound: the CPU is shared with a vLLM server; typical p50 is ~6 ms (ONNX).
    assert float(np.median(times)) < 0.1


def test_entry_round_trip_keeps_tokens(embedder: Embedder) -> None:
    [embedding] = embedder.encode(["How do I bake bread?"])
    entry = Entry("scope", "How do I bake bread?", "answer-key")
    decoded, again = Entry.decode_embedding(entry.encode(embedding))
    assert decoded == entry
    np.testing.assert_array_equal(again.vector, embedding.vector)
    assert again.tokens is not None and embedding.tokens is not None
    np.testing.assert_array_equal(again.tokens, embedding.tokens)
    # Entries stored without token rows (plain vector) still decode.
    old, vector = Entry.decode(entry.encode(embedding.vector))
    assert old == entry
    np.testing.assert_array_equal(vector, embedding.vector)
    assert Entry.decode_embedding(entry.encode(embedding.vector))[1].tokens is None


# --- async callers and coalescing ---------------------------------------------------------


async def test_aembed_matches_embed(embedder: Embedder) -> None:
    texts = ["one question", "another question"]
    results = await asyncio.gather(embedder.aembed(texts), embedder.aembed(texts))
    for result in results:
        np.testing.assert_allclose(result, embedder.embed(texts), atol=1e-5)
    assert (await embedder.aembed([])).shape == (0, EMBEDDING_DIM)
    assert await embedder.aencode([]) == []
    with pytest.raises(TypeError):
        await embedder.aencode("not a list")


async def test_aencode_matches_encode(embedder: Embedder) -> None:
    [a] = await embedder.aencode(["one question"])
    [b] = embedder.encode(["one question"])
    np.testing.assert_allclose(a.vector, b.vector, atol=1e-5)
    assert a.tokens is not None and b.tokens is not None
    np.testing.assert_allclose(a.tokens, b.tokens, atol=1e-2)


async def wait_queued(model: Embedder, count: int) -> None:
    """Until ``count`` jobs wait in the queue."""
    for _ in range(2000):
        if model._queue.qsize() == count:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{model._queue.qsize()} jobs queued, expected {count}")


async def start_blocked_pass(model: Embedder, text: str) -> asyncio.Task[np.ndarray]:
    """A job the worker has taken and is running; call with ``model._lock`` held, so that
    the "pass" lasts until the caller releases the lock."""
    task = asyncio.create_task(model.aembed([text]))
    await wait_queued(model, 0)
    await asyncio.sleep(0.05)  # the worker finds nothing else waiting, then waits on the lock
    return task


def sharing(embedder: Embedder, **settings: int) -> Embedder:
    """A new embedder (own queue, worker and pass count) on ``embedder``'s loaded model."""
    model = Embedder(settings=embedder.settings.model_copy(update=settings))
    model._encoder = embedder._encoder
    return model


async def test_calls_arriving_during_a_pass_share_the_next_pass(embedder: Embedder) -> None:
    model = sharing(embedder, max_batch=8)
    texts = [f"question {i}: how do I {verb} a file?" for i, verb in enumerate("abcdefgh")]
    alone = [embedder.encode([t])[0] for t in texts]
    with model._lock:
        first = await start_blocked_pass(model, "a question that is being embedded")
        tasks = [asyncio.create_task(model.aencode([t])) for t in texts]
        await wait_queued(model, len(texts))
    await first
    results = await asyncio.gather(*tasks)
    assert model.forward_passes == 2  # the running pass, then all eight
    for [got], want in zip(results, alone, strict=True):
        np.testing.assert_allclose(got.vector, want.vector, atol=1e-5)
        assert got.tokens is not None and want.tokens is not None
        np.testing.assert_allclose(got.tokens, want.tokens, atol=2e-3)
    model.close()


async def test_concurrent_single_calls_cost_far_fewer_passes(embedder: Embedder) -> None:
    texts = [f"how long does it take to learn language number {i}?" for i in range(20)]
    alone = embedder.embed(texts)
    before = embedder.forward_passes
    results = await asyncio.gather(*(embedder.aembed([t]) for t in texts))
    # Typically 1 + ceil(19 / max_batch) = 6 with the default of 4 texts per pass.
    assert embedder.forward_passes - before <= 8
    np.testing.assert_allclose(np.concatenate(results), alone, atol=1e-5)


def record(done: list[str], text: str, _: object) -> None:
    done.append(text)


async def test_a_round_answers_the_shortest_texts_first(embedder: Embedder) -> None:
    model = sharing(embedder, max_batch=1)
    done: list[str] = []
    texts = ["a much longer question about the history of the Roman empire", "hi", "medium one"]
    with model._lock:
        first = await start_blocked_pass(model, "a question that is being embedded")
        tasks = [asyncio.create_task(model.aembed([t])) for t in texts]
        for text, task in zip(texts, tasks, strict=True):
            task.add_done_callback(functools.partial(record, done, text))
        await wait_queued(model, len(texts))
    await first
    await asyncio.gather(*tasks)
    assert done == sorted(texts, key=len)
    model.close()


async def test_mixed_embed_and_encode_calls_share_a_pass(embedder: Embedder) -> None:
    before = embedder.forward_passes
    with embedder._lock:
        first = await start_blocked_pass(embedder, "a question that is being embedded")
        vectors = asyncio.create_task(embedder.aembed(["plain vector", "two texts"]))
        encoded = asyncio.create_task(embedder.aencode(["with tokens"]))
        await wait_queued(embedder, 2)
    await first
    assert (await vectors).shape == (2, EMBEDDING_DIM)
    [with_tokens] = await encoded
    assert with_tokens.tokens is not None
    assert embedder.forward_passes - before == 2


async def test_a_cancelled_caller_does_not_disturb_the_others(embedder: Embedder) -> None:
    with embedder._lock:
        first = await start_blocked_pass(embedder, "a question that is being embedded")
        tasks = [asyncio.create_task(embedder.aembed([f"text {i}"])) for i in range(3)]
        await wait_queued(embedder, 3)
        tasks[1].cancel()
    await first
    assert (await tasks[0]).shape == (1, EMBEDDING_DIM)
    assert (await tasks[2]).shape == (1, EMBEDDING_DIM)
    assert tasks[1].cancelled()
    assert (await embedder.aembed(["after"])).shape == (1, EMBEDDING_DIM)


class FailingEncoder:
    name, dim = "fake", EMBEDDING_DIM
    content = np.ones(10, dtype=bool)

    def forward(self, batch: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        raise RuntimeError("forward failed")


async def test_a_failed_pass_fails_its_callers_and_the_worker_survives(
    embedder: Embedder,
) -> None:
    model = Embedder(settings=embedder.settings)
    model._encoder = FailingEncoder()
    results = await asyncio.gather(
        model.aembed(["a"]), model.aencode(["b"]), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) for r in results)
    model._encoder = embedder._encoder
    assert (await model.aembed(["works again"])).shape == (1, EMBEDDING_DIM)
    model.close()
    assert model._worker is None
    assert (await model.aembed(["the worker restarts"])).shape == (1, EMBEDDING_DIM)
    model.close()


async def test_a_request_split_over_passes_is_answered_whole_and_in_order(
    embedder: Embedder,
) -> None:
    model = sharing(embedder, max_batch=1)
    texts = ["a rather long question about compilers and their passes", "short", "mid length"]
    results = await asyncio.gather(model.aencode(texts), model.aembed(texts[:1]))
    assert model.forward_passes == 4
    np.testing.assert_allclose(
        np.stack([e.vector for e in results[0]]), embedder.embed(texts), atol=1e-5
    )
    np.testing.assert_allclose(results[1], embedder.embed(texts[:1]), atol=1e-5)
    model.close()
