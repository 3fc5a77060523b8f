"""Token counts for the served models, for stages that budget prompts.

``count`` is exact: the model's own tokenizer when a local copy of its folder is known
(``tokenizer.json``, read with the ``tokenizers`` library), else vLLM's ``/tokenize``.
``estimate`` is the fast count for budgets: exact when local, otherwise characters divided
by the characters-per-token ratio this model showed on earlier exact counts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from leangate.backend.client import BackendClient
from leangate.backend.errors import BackendProtocolError

log = logging.getLogger(__name__)

DEFAULT_CHARS_PER_TOKEN = 4.0
MESSAGE_OVERHEAD_TOKENS = 5
"""Role markers a chat template adds per message (``<|im_start|>user\\n … <|im_end|>\\n``)."""


class Tokenizer:
    def __init__(
        self, backend: BackendClient, local_dirs: Mapping[str, Path] | None = None
    ) -> None:
        self._backend = backend
        self._dirs = dict(local_dirs or {})
        self._local: dict[str, Any] = {}
        self._ratio: dict[str, tuple[int, int]] = {}  # model -> (chars, tokens) seen

    def load_local(self) -> None:
        """Read every configured local tokenizer now (a few hundred ms each), rather than
        inside the first request that counts tokens."""
        for model in self._dirs:
            self._local_tokenizer(model)

    def _local_tokenizer(self, model: str) -> Any | None:
        if model in self._local:
            return self._local[model]
        found = None
        folder = self._dirs.get(model)
        if folder is not None and (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            found = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        self._local[model] = found
        return found

    def estimate(self, model: str, text: str) -> int:
        """A fast token count of ``text`` (exact with a local tokenizer)."""
        local = self._local_tokenizer(model)
        if local is not None:
            return len(local.encode(text, add_special_tokens=False).ids)
        chars, tokens = self._ratio.get(model, (0, 0))
        per_token = chars / tokens if tokens else DEFAULT_CHARS_PER_TOKEN
        return max(1, round(len(text) / per_token)) if text else 0

    def estimate_many(self, model: str, texts: Sequence[str]) -> list[int]:
        """``estimate`` of each text, in one batch (the local tokenizer encodes a batch in
        parallel, several times faster than one call per text)."""
        local = self._local_tokenizer(model)
        if local is None:
            return [self.estimate(model, text) for text in texts]
        encoded = local.encode_batch(list(texts), add_special_tokens=False)
        return [len(e.ids) for e in encoded]

    def estimate_messages(self, model: str, messages: Sequence[Mapping[str, Any]]) -> int:
        return sum(
            self.estimate(model, str(m.get("content") or "")) + MESSAGE_OVERHEAD_TOKENS
            for m in messages
        )

    async def count(
        self,
        model: str,
        *,
        text: str | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
    ) -> int:
        """The exact token count of a prompt (``text``) or a chat (``messages``, with the
        model's chat template and the generation prompt)."""
        local = self._local_tokenizer(model)
        if local is not None and text is not None:
            return len(local.encode(text, add_special_tokens=False).ids)
        payload: dict[str, Any] = {"model": model}
        if messages is not None:
            payload.update(messages=list(messages), add_generation_prompt=True)
        else:
            payload["prompt"] = text or ""
        response = await self._backend.send(
            "/tokenize", json.dumps(payload).encode(), model=model, stream=False
        )
        try:
            count = int(json.loads(await response.read())["count"])
        except (ValueError, KeyError, TypeError) as exc:
            raise BackendProtocolError("the backend's /tokenize answer has no count") from exc
        if text:
            chars, tokens = self._ratio.get(model, (0, 0))
            self._ratio[model] = (chars + len(text), tokens + count)
        return count
