"""``leangate bench sot``: Skeleton-of-Thought against direct answers, on the real backend.

Data: the hand-labelled Vicuna-80 and WizardLM questions in ``<data-dir>/sot/*_router.csv``,
and FastChat's reference answers in ``<data-dir>/fastchat/`` for coverage where they exist.

1. *router*: nested 5-fold cross-validation of the router over both labelled sets, the
   mean of five shuffles (``router_accuracy``, ``router_precision``): no question is judged
   by a model, a vocabulary or a threshold that saw it.
2. *speed*: questions the router sends to SoT (router-positive) and questions it does not
   (router-negative), each answered directly by vLLM and through a proxy running the
   ``sot`` stage (auto: router and cost model decide), with the same ``max_tokens`` cap and
   temperature 0, the arms alternating in order. Reported: median latency ratios
   (direct / leangate) per group, the streamed time-to-first-token ratio, and coverage:
   each answer's embedding similarity to the reference answer where FastChat has one, to
   the question itself otherwise (FastChat's references cover only math, reasoning and code,
   which the router keeps direct); ``coverage_delta_median`` is SoT's minus the direct
   answer's, ``coverage_references`` how many had a reference answer. SoT's similarity to
   the direct answer is reported beside it. ``by_category``: the median speed-up per
   question category (Vicuna-80's categories; WizardLM's questions are "wizardlm").
3. *cost model*: for router-positive questions the proxy's predictions (``x-leangate-plan``)
   are compared with which arm was really faster (a forced-SoT proxy measures the SoT arm
   when the cost model chose direct): ``cost_model_agreement``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from leangate.backend.localvllm import MODEL_NAME
from leangate.planners.router import RouterWeights, read_labelled, repeated_cross_validate
from leangate.planners.sot import PLAN_HEADER

from .common import (
    BenchError,
    add_common_arguments,
    backend_urls,
    header_fields,
    log,
    machine_info,
    rounded,
    spawn_proxy,
)

MODEL = MODEL_NAME  # the bundled model
REFERENCE_FILES = (
    "vicuna_bench_reference_answer_gpt-4.jsonl",
    "mt_bench_reference_answer_gpt-4.jsonl",
)
POLICY = """
rules:
  - name: sot
    stages: [{use: sot, settings: {mode: %s}}]
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--parts", default="router,speed")
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument("--questions", type=int, default=None, help="per group")


def run(args: argparse.Namespace) -> dict[str, object]:
    if not (args.data_dir / "sot").is_dir():
        raise BenchError(f"{args.data_dir / 'sot'} is missing: this benchmark needs its CSVs")
    from leangate.cache.embedder import Embedder

    rows = read_labelled(args.data_dir)
    questions = [q for q, _, _ in rows]
    labels = [label for _, label, _ in rows]
    embedder = Embedder()
    vectors = embedder.embed(questions)
    result: dict[str, object] = {"benchmark": "sot", "quick": bool(args.quick)}
    started = time.perf_counter()
    weights = RouterWeights.load()
    if "router" in args.parts:
        cv = repeated_cross_validate(questions, vectors, labels, rules=weights.rules)
        result.update(
            router_accuracy=rounded(cv.accuracy, 3),
            router_precision=rounded(cv.precision, 3),
            router_recall=rounded(cv.recall, 3),
            router_labelled=len(labels),
        )
    if "speed" in args.parts:
        count = args.questions or (4 if args.quick else 12)
        routed = [weights.suits(q, v) for q, v in zip(questions, vectors, strict=True)]
        rng = random.Random(args.seed)
        positives = rng.sample([q for q, r in zip(questions, routed, strict=True) if r], count)
        negatives = rng.sample([q for q, r in zip(questions, routed, strict=True) if not r], count)
        references = _references(args.data_dir)
        categories = question_categories(args.data_dir, rows)
        with backend_urls(args) as urls:
            result.update(
                _speed(
                    urls, positives, negatives, references, embedder, args.max_tokens, categories
                )
            )
    result["duration_s"] = round(time.perf_counter() - started, 1)
    result["machine"] = machine_info()
    return result


def _references(data_dir: Path) -> dict[str, str]:
    """FastChat's reference answers by question text (only some questions have one)."""
    folder = data_dir / "fastchat"
    texts: dict[int, str] = {}
    answers: dict[str, str] = {}
    for name in ("vicuna_bench_question.jsonl", "mt_bench_question.jsonl"):
        path = folder / name
        if path.is_file():
            prefix = name.split("_")[0]
            for line in path.read_text().splitlines():
                item = json.loads(line)
                texts[hash((prefix, item["question_id"]))] = item["turns"][0]
    for name in (
        "vicuna_bench_reference_answer_gpt-4.jsonl",
        "mt_bench_reference_answer_gpt-4.jsonl",
    ):
        path = folder / name
        if path.is_file():
            prefix = name.split("_")[0]
            for line in path.read_text().splitlines():
                item = json.loads(line)
                question = texts.get(hash((prefix, item["question_id"])))
                if question:
                    answers[question] = item["choices"][0]["turns"][0]
    return answers


def _ask(
    http: httpx.Client, url: str, question: str, max_tokens: int
) -> tuple[float, dict[str, Any], str]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    started = time.perf_counter()
    response = http.post(f"{url}/v1/chat/completions", json=body)
    response.raise_for_status()
    took = time.perf_counter() - started
    return took, response.json(), response.headers.get(PLAN_HEADER, "")


def _ttft(http: httpx.Client, url: str, question: str, max_tokens: int) -> float:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    started = time.perf_counter()
    with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                return time.perf_counter() - started
    return time.perf_counter() - started


def _ttft_ratio(
    http: httpx.Client,
    direct_url: str,
    sot_url: str,
    question: str,
    max_tokens: int,
    *,
    first_direct: bool,
) -> float:
    """SoT's time to first token (always planned) over the direct stream's, in turns."""
    arms = [direct_url, sot_url] if first_direct else [sot_url, direct_url]
    took = {url: _ttft(http, url, question, max_tokens) for url in arms}
    log(f"ttft: direct {took[direct_url]:.2f}s, sot {took[sot_url]:.2f}s")
    return took[sot_url] / took[direct_url]


def _text(answer: dict[str, Any]) -> str:
    return str(answer["choices"][0]["message"]["content"] or "")


def _wait_calibrated(http: httpx.Client, url: str, question: str) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        _, _, header = _ask(http, url, question, 8)
        if "uncalibrated" not in header:
            return
        time.sleep(2)
    raise BenchError("the proxy's backend profile did not calibrate within 300 s")


def _speed(
    urls: list[str],
    positives: list[str],
    negatives: list[str],
    references: dict[str, str],
    embedder: Any,
    max_tokens: int,
    categories: dict[str, str],
) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as folder:
        auto, forced = Path(folder) / "auto.yaml", Path(folder) / "always.yaml"
        auto.write_text(POLICY % "auto")
        forced.write_text(POLICY % "always")
        with (
            spawn_proxy(urls, policy=auto) as proxy,
            spawn_proxy(urls, policy=forced) as always,
            httpx.Client(timeout=900) as http,
        ):
            _wait_calibrated(http, proxy.url, positives[0])
            rows = [
                _compare(http, urls[0], proxy.url, always.url, q, max_tokens, group, i)
                for group, group_questions in (("positive", positives), ("negative", negatives))
                for i, q in enumerate(group_questions)
            ]
            ttft = [
                _ttft_ratio(http, urls[0], always.url, q, max_tokens, first_direct=bool(i % 2))
                for i, q in enumerate(positives[: max(2, len(positives) // 2)])
            ]
    figures = _figures(rows, ttft, references, embedder)
    figures["by_category"] = by_category(rows, categories)
    return figures


def _compare(
    http: httpx.Client,
    direct_url: str,
    proxy_url: str,
    forced_url: str,
    question: str,
    max_tokens: int,
    group: str,
    index: int,
) -> dict[str, Any]:
    arms = [("direct", direct_url), ("leangate", proxy_url)]
    if index % 2:
        arms.reverse()  # alternate which arm runs first
    row: dict[str, Any] = {"group": group, "question": question}
    for name, url in arms:
        took, answer, header = _ask(http, url, question, max_tokens)
        row[name] = {"s": took, "text": _text(answer), "plan": header_fields(header)}
    plan = row["leangate"]["plan"]
    if group == "positive" and plan["decision"] == "direct" and "predicted_sot_s" in plan:
        took, answer, _ = _ask(http, forced_url, question, max_tokens)
        row["forced_sot_s"] = took
    log(
        f"{group} {index}: direct {row['direct']['s']:.1f}s, leangate {row['leangate']['s']:.1f}s "
        f"({plan.get('decision')}, {plan.get('reason')})"
    )
    return row


def _figures(
    rows: list[dict[str, Any]], ttft: list[float], references: dict[str, str], embedder: Any
) -> dict[str, object]:
    def ratios(group: str) -> list[float]:
        return [r["direct"]["s"] / r["leangate"]["s"] for r in rows if r["group"] == group]

    deltas, sot_vs_direct, agree = [], [], []
    referenced = 0
    for row in rows:
        if row["leangate"]["plan"].get("decision") == "sot":
            reference = references.get(row["question"])
            referenced += reference is not None
            texts = [row["leangate"]["text"], row["direct"]["text"], reference or row["question"]]
            vectors = embedder.embed(texts)
            sot_vs_direct.append(float(vectors[0] @ vectors[1]))
            deltas.append(float(vectors[0] @ vectors[2] - vectors[1] @ vectors[2]))
        agree.extend(_agreement(row))
    return {
        "speedup_positive_median": rounded(statistics.median(ratios("positive")), 3),
        "speedup_negative_median": rounded(statistics.median(ratios("negative")), 3),
        "sot_share_positive": rounded(
            float(
                np.mean(
                    [
                        r["leangate"]["plan"].get("decision") == "sot"
                        for r in rows
                        if r["group"] == "positive"
                    ]
                )
            ),
            3,
        ),
        "coverage_delta_median": rounded(statistics.median(deltas), 3) if deltas else None,
        "coverage_references": referenced,
        "sot_similarity_to_direct_median": (
            rounded(statistics.median(sot_vs_direct), 3) if sot_vs_direct else None
        ),
        "ttft_ratio": rounded(statistics.median(ttft), 3) if ttft else None,
        "cost_model_agreement": rounded(float(np.mean(agree)), 3) if agree else None,
        "cost_model_judged": len(agree),
        "questions_per_group": len(rows) // 2,
    }


def question_categories(data_dir: Path, rows: list[tuple[str, int, str]]) -> dict[str, str]:
    """Each labelled question's category: Vicuna-80's own, from FastChat's question file
    (generic, knowledge, fermi, ...), else the name of its set ("wizardlm"), whose questions
    carry none. SoT pays on some kinds of question and not others, so speed-ups are also
    reported per category."""
    path = data_dir / "fastchat" / "vicuna_bench_question.jsonl"
    known: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            item = json.loads(line)
            known[item["turns"][0].strip()] = str(item["category"])
    return {
        question: known.get(question.strip(), set_name.split("_")[0])
        for question, _, set_name in rows
    }


def by_category(rows: list[dict[str, Any]], categories: dict[str, str]) -> list[dict[str, object]]:
    """Median speed-up (direct / leangate) per question category, both router groups
    together, with how many questions each median rests on and the share SoT answered."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(categories.get(row["question"], "unknown"), []).append(row)
    return [
        {
            "category": category,
            "questions": len(members),
            "positives": sum(r["group"] == "positive" for r in members),
            "speedup_median": rounded(
                statistics.median(r["direct"]["s"] / r["leangate"]["s"] for r in members), 3
            ),
            "sot_share": rounded(
                sum(r["leangate"]["plan"].get("decision") == "sot" for r in members) / len(members),
                3,
            ),
        }
        for category, members in sorted(grouped.items())
    ]


def _agreement(row: dict[str, Any]) -> list[bool]:
    """Whether the cost model's choice matched the arm that was faster (positives only)."""
    plan = row["leangate"]["plan"]
    if row["group"] != "positive" or "predicted_sot_s" not in plan:
        return []
    chose_sot = plan["decision"] == "sot"
    sot_s = row["leangate"]["s"] if chose_sot else row.get("forced_sot_s")
    if sot_s is None:
        return []
    return [chose_sot == (sot_s < row["direct"]["s"])]
