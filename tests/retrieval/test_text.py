"""Segmentation and protected spans."""

from __future__ import annotations

from leangate.retrieval.spans import protected_spans
from leangate.retrieval.text import assemble, segment


def _kinds(text: str) -> dict[str, str]:
    return {text[s.start : s.end]: s.kind for s in protected_spans(text)}


def test_protected_spans_of_each_kind() -> None:
    text = (
        'Send {"id": 7, "tags": ["a"]} to https://example.org/x.html, see [docs](https://d.io/a) '
        'and `run()`. He said "Stop now." at 3.5 bar. <keep>Do not drop.</keep>\n'
        "User: hello"
    )
    kinds = _kinds(text)
    assert kinds['{"id": 7, "tags": ["a"]}'] == "json"
    assert kinds["https://example.org/x.html"] == "url"
    assert kinds["[docs](https://d.io/a)"] == "link"
    assert kinds["`run()`"] == "inline_code"
    assert kinds['"Stop now."'] == "quote"
    assert kinds["3.5"] == "number"
    assert kinds["<keep>Do not drop.</keep>"] == "keep"
    assert kinds["User:"] == "label"


def test_a_citation_marker_is_a_number_not_json() -> None:
    assert _kinds("As shown [1], it works.")["1"] == "number"


def test_code_blocks_fenced_and_indented() -> None:
    fenced = "Intro.\n\n```python\nx = 1\n\ny = 2\n```\n\nAfter."
    indented = "Intro.\n\n    a = 1\n    b = 2\n\nAfter."
    for text, block in (
        (fenced, "```python\nx = 1\n\ny = 2\n```"),
        (indented, "    a = 1\n    b = 2"),
    ):
        segments = segment(text)
        blocks = [s for s in segments if s.kind == "block"]
        assert [s.text for s in blocks] == [block.strip()] or [s.text for s in blocks] == [block]
        assert blocks[0].hard


def test_sentences_do_not_split_inside_spans_or_after_abbreviations() -> None:
    text = 'Dr. Lee met Mr. Ode in the U.S. office. The sign read "Wait. Then go." Done at 4.30 pm.'
    assert [s.text for s in segment(text)] == [
        "Dr. Lee met Mr. Ode in the U.S. office.",
        'The sign read "Wait. Then go."',
        "Done at 4.30 pm.",
    ]


def test_headings_titles_and_labels_are_segments_of_their_own() -> None:
    text = (
        "## Tools\nA hammer. A saw.\n\nGarden Notes\nWater daily.\n\nUser: Hi there. How are you?"
    )
    segments = segment(text)
    assert [(s.kind, s.text) for s in segments] == [
        ("heading", "## Tools"),
        ("sentence", "A hammer."),
        ("sentence", "A saw."),
        ("heading", "Garden Notes"),
        ("sentence", "Water daily."),
        ("heading", "User:"),
        ("sentence", "Hi there."),
        ("sentence", "How are you?"),
    ]
    assert [s.paragraph for s in segments] == [0, 0, 0, 1, 1, 2, 2, 2]


def test_wrapped_lines_are_one_sentence_and_list_items_are_not() -> None:
    text = "This sentence is wrapped\nover two lines.\n- first item\n- second item"
    assert [s.text for s in segment(text)] == [
        "This sentence is wrapped\nover two lines.",
        "- first item",
        "- second item",
    ]


def test_a_sentence_holding_a_hard_span_is_hard() -> None:
    segments = segment("Plain words here. Visit https://a.example/b today. More words.")
    assert [s.hard for s in segments] == [False, True, False]


def test_assemble_keeps_whitespace_and_paragraph_breaks() -> None:
    text = "  A one. A two.\n\nB one. B two.\n\nC one.\n"
    segments = segment(text)
    assert assemble(text, segments, range(len(segments))) == text
    assert assemble(text, segments, [0, 4]) == "  A one.\n\nC one.\n"
    assert assemble(text, segments, [2, 3]) == "B one. B two."
    assert assemble(text, segments, []) == ""


def test_pretty_printed_json_is_one_block_and_stray_brackets_cost_little() -> None:
    value = '{\n  "name": "relay",\n  "pins": [1, 2, {"id": "x\\"y"}]\n}'
    text = f"The config follows.\n\n{value}\n\nIt is loaded at boot."
    blocks = [s for s in segment(text) if s.kind == "block"]
    assert [b.text for b in blocks] == [value] and blocks[0].hard
    prose = "word { more [ text. " * 3000  # never closed: one pass, not one scan per bracket
    assert [s.kind for s in protected_spans(prose)] == []
