"""HotpotQA records as long prompts, for ``leangate bench compress``.

A record's ``context`` is a list of ``[title, [sentences]]`` and its ``supporting_facts`` a
list of ``[title, sentence_index]``; both may come as JSON (or Python-literal) strings.
The split into a tune part and a held-out part is fixed by a hash of ``_id``, before any
result is looked at.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FILE = Path("hotpotqa") / "dev_distractor_20.json"
INSTRUCTION = (
    "Answer the question using only the documents below. Reply with a few words, no explanation."
)


@dataclass(frozen=True, slots=True)
class Record:
    id: str
    question: str
    answer: str
    paragraphs: list[tuple[str, list[str]]]
    supporting: list[str]
    """The gold supporting sentences' text (stripped)."""

    @property
    def tune(self) -> bool:
        return is_tune(self.id)


def is_tune(record_id: str) -> bool:
    """The tune part: the first byte of sha256(_id) is even; the rest is held out."""
    return hashlib.sha256(record_id.encode()).digest()[0] % 2 == 0


def _field(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return ast.literal_eval(value)


def load(data_dir: Path) -> list[Record]:
    raw = json.loads((data_dir / FILE).read_text())
    records = []
    for item in raw:
        paragraphs = [(str(t), [str(s) for s in sents]) for t, sents in _field(item["context"])]
        by_title = dict(paragraphs)
        supporting = [
            by_title[t][i].strip()
            for t, i in _field(item["supporting_facts"])
            if t in by_title and 0 <= i < len(by_title[t])
        ]
        records.append(
            Record(
                str(item["_id"]),
                str(item["question"]),
                str(item["answer"]),
                paragraphs,
                supporting,
            )
        )
    return records


def document(paragraphs: list[tuple[str, list[str]]]) -> str:
    return "\n\n".join(
        f"## {title}\n" + " ".join(s.strip() for s in sents if s.strip())
        for title, sents in paragraphs
    )


def prompt(record: Record, *, padding: list[tuple[str, list[str]]] | None = None) -> str:
    """Instruction, the record's paragraphs (and padding paragraphs, shuffled in by the
    record's id), then the question."""
    paragraphs = list(record.paragraphs)
    if padding:
        paragraphs += padding
        random.Random(record.id).shuffle(paragraphs)
    return f"{INSTRUCTION}\n\n{document(paragraphs)}\n\nQuestion: {record.question}"


def retention(record: Record, compressed: str) -> tuple[int, int]:
    """Gold supporting sentences kept intact, of all of them."""
    return sum(s in compressed for s in record.supporting), len(record.supporting)
