"""Document ingestion on any input: documents as callers send them (attached, or to a
corpus through the API), and their chunks."""

from __future__ import annotations

import re

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from leangate.middleware.corpora_api import MAX_BATCH, AddRequest, _parse
from leangate.middleware.errors import InvalidRequest
from leangate.retrieval.chunks import chunk_document
from leangate.retrieval.documents import MAX_ID_CHARS, Document
from leangate.retrieval.text import segment

_pieces = st.sampled_from(
    ["# Title\n", "Intro:\n", "\n\n", "\n", ". ", "? ", "Dr. ", "e.g. ", "```\ncode()\n```\n",
     "- item\n", "| a | b |\n", '{"k": 1}', "Speaker: ", "  ", "\t", "\u2028", "3.14 ", "!"]
)  # fmt: skip
_texts = st.lists(_pieces | st.text(max_size=40), max_size=30).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=_texts, max_tokens=st.integers(1, 200), title=st.text(max_size=10))
def test_chunks_are_the_documents_sentences_in_order_within_paragraphs(
    text: str, max_tokens: int, title: str
) -> None:
    chunks = chunk_document("doc", text, metadata={"title": title}, max_tokens=max_tokens)
    assert [c.position for c in chunks] == list(range(len(chunks)))
    assert [c.id for c in chunks] == [f"doc#{i}" for i in range(len(chunks))]
    previous_end, previous_paragraph = 0, 0
    for chunk in chunks:
        assert chunk.text == text[chunk.start : chunk.end]
        assert previous_end <= chunk.start < chunk.end
        assert chunk.paragraph >= previous_paragraph
        assert all(sentence in chunk.text for sentence in chunk.sentences)
        assert chunk.text.startswith(chunk.sentences[0])
        assert chunk.text.endswith(chunk.sentences[-1])
        if len(chunk.sentences) > 1:
            assert sum(max(1, round(len(s) / 4)) for s in chunk.sentences) <= max_tokens
        previous_end, previous_paragraph = chunk.end, chunk.paragraph


@settings(max_examples=200, deadline=None)
@given(text=_texts)
def test_every_sentence_is_in_exactly_one_chunk(text: str) -> None:
    chunked = [s for c in chunk_document("doc", text, max_tokens=20) for s in c.sentences]
    assert chunked == [s.text for s in segment(text) if s.kind != "heading"]


_ID = re.compile(r"[^\s\x1c-\x1f\x85\ufeff#][^#]*", re.DOTALL)


@settings(max_examples=300, deadline=None)
@given(doc_id=st.text(max_size=MAX_ID_CHARS + 2), text=st.text(max_size=20))
def test_a_document_is_accepted_exactly_when_its_fields_are_valid(doc_id: str, text: str) -> None:
    valid = bool(_ID.fullmatch(doc_id)) and len(doc_id) <= MAX_ID_CHARS and bool(text)
    try:
        document = Document(id=doc_id, text=text)
    except ValidationError:
        assert not valid
        return
    assert valid
    assert Document.model_validate(orjson.loads(orjson.dumps(document.model_dump()))) == document


_bodies = st.one_of(
    st.binary(max_size=200),
    st.lists(
        st.fixed_dictionaries(
            {"id": st.text(max_size=6), "text": st.text(max_size=20)},
            optional={"metadata": st.dictionaries(st.text(max_size=4), st.none() | st.text())},
        ),
        max_size=6,
    ).map(lambda docs: orjson.dumps({"documents": docs})),
)


@settings(max_examples=300, deadline=None)
@given(body=_bodies)
def test_an_ingest_body_is_documents_or_an_invalid_request(body: bytes) -> None:
    try:
        request = _parse(AddRequest, body)
    except InvalidRequest as exc:
        assert exc.status_code == 400 and exc.message
        return
    assert 1 <= len(request.documents) <= MAX_BATCH


@pytest.mark.parametrize("count", [MAX_BATCH + 1, 1_000_000])
def test_a_batch_over_the_limit_names_its_size(count: int) -> None:
    body = b'{"documents":[' + b",".join([b'{"id":"d","text":"w"}'] * count) + b"]}"
    with pytest.raises(InvalidRequest, match=f"{count} documents in one request"):
        _parse(AddRequest, body)
