"""The tokenizer service's local counts: batched counts equal single ones, and a
configured tokenizer can be read before the first request."""

from __future__ import annotations

import pytest

from leangate.backend.client import BackendClient, BackendSettings
from leangate.backend.localvllm import MODEL_NAME, LocalVLLMConfig
from leangate.backend.tokenizer import Tokenizer

TEXTS = ["The Quillon Lighthouse stands on Varell Island.", "", "Zeta pumps move water."]


def _tokenizer() -> Tokenizer:
    folder = LocalVLLMConfig().model_dir
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"the bundled model is not prepared at {folder} (localvllm prepare)")
    return Tokenizer(BackendClient(BackendSettings(urls=["http://unused"])), {MODEL_NAME: folder})


def test_batched_counts_equal_single_counts() -> None:
    tokenizer = _tokenizer()
    single = [tokenizer.estimate(MODEL_NAME, text) for text in TEXTS]
    assert tokenizer.estimate_many(MODEL_NAME, TEXTS) == single
    assert single[0] > 5 and single[1] == 0


def test_local_tokenizers_load_ahead() -> None:
    tokenizer = _tokenizer()
    tokenizer.load_local()
    assert tokenizer._local[MODEL_NAME] is not None


def test_without_a_local_tokenizer_counts_are_estimates() -> None:
    tokenizer = Tokenizer(BackendClient(BackendSettings(urls=["http://unused"])))
    tokenizer.load_local()  # nothing configured: nothing to read
    assert tokenizer.estimate_many("m", ["abcdefgh", ""]) == [2, 0]
