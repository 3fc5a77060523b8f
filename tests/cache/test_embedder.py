"""Embedder tests (real offline MiniLM, CPU)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from leangate.cache.embedder import EMBEDDING_DIM, MAX_TOKENS, Embedder, default_model_path
from leangate.cache.semantic import Entry


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    model = Embedder()
    model.load()
    return model


def test_default_model_path_points_at_shipped_model() -> None:
    path = default_model_path()
    assert (path / "modules.json").is_file()
    assert (path / "model.safetensors").is_file()


def test_constructor_does_not_load() -> None:
    lazy = Embedder()
    assert not lazy.loaded
    assert lazy.dim == EMBEDDING_DIM


def test_load_is_idempotent(embedder: Embedder) -> None:
    model = embedder._model
    embedder.load()
    assert embedder._model is model


def test_embed_shape_dtype_and_norm(embedder: Embedder) -> None:
    vectors = embedder.embed(["How do I bake bread?", "A much longer sentence " * 20, "x"])
    assert vectors.shape == (3, EMBEDDING_DIM)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_embed_empty_and_str_rejected(embedder: Embedder) -> None:
    assert embedder.embed([]).shape == (0, EMBEDDING_DIM)
    with pytest.raises(TypeError):
        embedder.embed("not a list")


def test_batch_order_and_values_match_single(embedder: Embedder) -> None:
    texts = ["a long sentence about the weather in Paris today", "hi", "medium length text"]
    batch = embedder.embed(texts)
    for i, text in enumerate(texts):
        np.testing.assert_allclose(batch[i], embedder.embed([text])[0], atol=1e-5)


def test_paraphrase_closer_than_unrelated(embedder: Embedder) -> None:
    a, b, c = embedder.embed(
        ["How can I reset my password?", "How do I change my password?", "Best pizza in Rome"]
    )
    assert float(a @ b) > float(a @ c) + 0.3


async def test_aembed_matches_embed(embedder: Embedder) -> None:
    texts = ["one question", "another question"]
    results = await asyncio.gather(embedder.aembed(texts), embedder.aembed(texts))
    for result in results:
        np.testing.assert_allclose(result, embedder.embed(texts), atol=1e-5)


def test_single_query_latency(embedder: Embedder) -> None:
    query = ["How do I install Python 3.11 on Ubuntu?"]
    for _ in range(3):
        embedder.embed(query)
    times = []
    for _ in range(15):
        start = time.perf_counter()
        embedder.embed(query)
        times.append(time.perf_counter() - start)
    # Generous bound: the CPU is shared with a vLLM server; typical p50 is ~9 ms.
    assert float(np.median(times)) < 0.1


def test_encode_matches_embed_and_keeps_content_tokens(embedder: Embedder) -> None:
    texts = ["How do I install Python 3.11 on Ubuntu?", "the of and", "?"]
    encoded = embedder.encode(texts)
    np.testing.assert_allclose(
        np.stack([e.vector for e in encoded]), embedder.embed(texts), atol=1e-5
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
    assert embedder.encode([]) == []
    with pytest.raises(TypeError):
        embedder.encode("not a list")


def test_encode_caps_tokens(embedder: Embedder) -> None:
    [long] = embedder.encode(["alpha beta gamma delta " * 60])
    assert long.tokens is not None and long.tokens.shape[0] == MAX_TOKENS


async def test_aencode_matches_encode(embedder: Embedder) -> None:
    [a] = await embedder.aencode(["one question"])
    [b] = embedder.encode(["one question"])
    np.testing.assert_allclose(a.vector, b.vector, atol=1e-5)
    assert a.tokens is not None and b.tokens is not None
    np.testing.assert_allclose(a.tokens, b.tokens, atol=1e-2)


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
