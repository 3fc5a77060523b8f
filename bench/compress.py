"""``leangate bench compress``: prompt compression's fidelity, cost and end-to-end speed.

1. *fidelity* on ``<data-dir>/hotpotqa/dev_distractor_20.json``: prompt = instruction, the
   record's 10 paragraphs, the question; compressed question-aware to ``--ratio``.
   ``token_reduction`` (prompt tokens before over after, the served model's tokenizer) and
   ``supporting_fact_retention`` (gold supporting sentences kept intact), for the tune part
   (``_tune``, what the selection was designed and tuned on) and the held-out part
   (``_holdout``, and the unsuffixed figures). The split is by a hash of ``_id``
   (``bench/hotpot.py``). ``ms_per_1k_tokens``: the compressor's wall time per 1,000
   prompt tokens, median over records (``cpu_ms_per_1k_tokens``: its CPU time, which the
   shared machine's load does not inflate).
2. *protected spans*: prompts built here in code (code blocks, JSON, links, URLs, speaker
   labels, numbers, quotes, ``<keep>`` spans) compressed hard; ``protected_span_violations``
   counts hard spans lost, sentences cut, and instructions or questions altered.
3. *end to end* on the real backend: each record padded with other records' paragraphs to
   2,000+ tokens, ``max_tokens`` 32 (with ``ignore_eos``, so both arms decode the same
   length), temperature 0, a nonce at the start of every prompt so that vLLM's prefix
   cache cannot hit; direct to vLLM against a proxy running the ``compress`` stage, arms
   alternating in order, medians. ``e2e_speedup_long`` cold; ``e2e_speedup_warm``: the
   same context again with another question (the direct arm's prefix is warm);
   ``cost_share_of_prefill_saved``: compressor time over the backend time it saved;
   ``e2e_compressor_ms_per_1k_tokens_median``: the stage's own time inside the proxy, on
   the cores vLLM uses too.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from leangate.backend.localvllm import MODEL_NAME
from leangate.retrieval.compress import HEADER, CompressSettings
from leangate.retrieval.prompt import budget, plan, rebuild
from leangate.retrieval.prune import PruneSettings, thin
from leangate.retrieval.select import Selector
from leangate.retrieval.tokens import scoring_body

from . import hotpot
from .common import (
    BenchError,
    add_common_arguments,
    backend_urls,
    header_fields,
    log,
    machine_info,
    rounded,
    spawn_proxy,
    tokenizer_env,
    tokens_counter,
)
from .protected import protected_prompts, violations

MODEL = MODEL_NAME  # the bundled model
POLICY = """
rules:
  - name: compress
    stages:
      - use: compress
        budget_ms: 2000
        settings: {ratio: %s}
"""
LONG_PROMPT_TOKENS = 2000
Count = Callable[[str], int]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--ratio", type=float, default=4.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--parts", default="fidelity,spans,e2e,tokens,conversation")
    parser.add_argument("--records", type=int, default=None, help="end-to-end records")


def run(args: argparse.Namespace) -> dict[str, object]:
    started = time.perf_counter()
    count, tokenizer_dir = tokens_counter()
    result: dict[str, object] = {"benchmark": "compress", "quick": bool(args.quick)}
    result["tokens_counted_with"] = str(tokenizer_dir) if tokenizer_dir else "chars/4 estimate"
    path = args.data_dir / hotpot.FILE
    records = hotpot.load(args.data_dir) if path.is_file() else []
    if not records:
        result["missing_data"] = [str(path)]
        log(f"{path} is missing: no fidelity or end-to-end figures")
    if "fidelity" in args.parts and records:
        result.update(_fidelity(records, count, args.ratio))
    if "spans" in args.parts:
        result.update(_spans(count, args.ratio, quick=args.quick))
    if "e2e" in args.parts and records:
        with backend_urls(args) as urls:
            result.update(_e2e(urls, records, count, args, tokenizer_dir))
    if "tokens" in args.parts and records:
        with backend_urls(args) as urls:
            result.update(_tokens(urls[0], records, count, args.ratio))
    if "conversation" in args.parts:
        _merge(result, _conversation(args))
    result["duration_s"] = round(time.perf_counter() - started, 1)
    result["machine"] = machine_info()
    return result


def _conversation(args: argparse.Namespace) -> dict[str, object]:
    """``leangate bench conversation``'s figures (``planted_fact_retention``,
    ``prefix_cache_hit_ratio``, ...) at that benchmark's own defaults, on the same
    backend, data and seed."""
    from . import conversation

    parser = argparse.ArgumentParser()
    conversation.add_arguments(parser)
    own = parser.parse_args([])
    for name in ("quick", "data_dir", "backend_url", "redis_url", "seed", "proxy_command"):
        setattr(own, name, getattr(args, name))
    figures = conversation.run(own)
    for shared in ("benchmark", "quick", "duration_s", "machine", "tokens_counted_with"):
        figures.pop(shared, None)
    figures["conversation_settings"] = figures.pop("settings", {})
    return figures


def _merge(result: dict[str, object], figures: Mapping[str, object]) -> None:
    """Add ``figures``; a name ``result`` already has gets a ``conversation_`` prefix."""
    for name, value in figures.items():
        result[name if name not in result else f"conversation_{name}"] = value


def compress_text(text: str, count: Count, ratio: float) -> tuple[str, float]:
    """One user message compressed as the stage does it (lexical, second hop); seconds."""
    started = time.perf_counter()
    settings = CompressSettings()
    messages = [{"role": "user", "content": text}]
    found = plan(
        messages,
        count,
        min_block_tokens=settings.min_block_tokens,
        instruction_max_tokens=settings.instruction_max_tokens,
    )
    if found is None:
        return text, time.perf_counter() - started
    before = count(text)
    selector = Selector(found.question, found.candidates, settings.select)
    selector.second_hop()
    selection = selector.choose(budget(found, before, ratio=ratio))
    out = str(rebuild(messages, found, selection.keep)[0]["content"])
    return out, time.perf_counter() - started


# --- fidelity ----------------------------------------------------------------------------------


def _fidelity(records: list[hotpot.Record], count: Count, ratio: float) -> dict[str, object]:
    compress_text("warm-up " * 10, count, ratio)
    rows = []
    for record in records:
        text = hotpot.prompt(record)
        cpu = time.thread_time()
        out, seconds = compress_text(text, count, ratio)
        cpu = time.thread_time() - cpu
        kept, total = hotpot.retention(record, out)
        rows.append((record.tune, count(text), count(out), kept, total, seconds, cpu))
    figures: dict[str, object] = {}
    for name, part in (("_tune", True), ("_holdout", False)):
        chosen = [r for r in rows if r[0] is part]
        figures[f"token_reduction{name}"] = rounded(
            sum(r[1] for r in chosen) / sum(r[2] for r in chosen), 3
        )
        figures[f"supporting_fact_retention{name}"] = rounded(
            sum(r[3] for r in chosen) / sum(r[4] for r in chosen), 3
        )
        figures[f"records{name}"] = len(chosen)
    figures["token_reduction"] = figures["token_reduction_holdout"]
    figures["supporting_fact_retention"] = figures["supporting_fact_retention_holdout"]
    per_1k = [r[5] * 1e6 / r[1] for r in rows]
    figures["ms_per_1k_tokens"] = rounded(statistics.median(per_1k), 2)
    figures["ms_per_1k_tokens_max"] = rounded(max(per_1k), 2)
    figures["cpu_ms_per_1k_tokens"] = rounded(statistics.median(r[6] * 1e6 / r[1] for r in rows), 2)
    log(f"fidelity: {figures}")
    return figures


# --- token-level pruning -----------------------------------------------------------------------

PRUNE = PruneSettings(mode="always", share=0.3)


def _tokens(
    url: str, records: list[hotpot.Record], count: Count, ratio: float
) -> dict[str, object]:
    """The ``prune`` stage's method after compression, scored by the served model itself:
    the share of the kept sentences' tokens it drops (target ``PRUNE.share``), whether
    the gold answer still reads in the prompt, and the scoring time over the prefill
    it saves (the cost check's reason to skip a same-model scorer)."""
    rows = []
    with httpx.Client(timeout=300) as http:
        for record in records:
            text, _ = compress_text(hotpot.prompt(record), count, ratio)
            messages = [{"role": "user", "content": text}]
            found = plan(
                messages,
                count,
                min_block_tokens=PRUNE.min_block_tokens,
                instruction_max_tokens=PRUNE.instruction_max_tokens,
            )
            if found is None:
                continue
            (part,) = found.parts
            started = time.perf_counter()
            answer = http.post(f"{url}/v1/completions", json=scoring_body(text, MODEL)).json()
            scoring_s = time.perf_counter() - started
            out, dropped = thin(part, answer, PRUNE.share)
            rows.append(
                (
                    record.tune,
                    dropped / max(found.compressible_tokens, 1),
                    record.answer in text,
                    record.answer in out,
                    scoring_s,
                    count(text) - count(out),
                    count(text),
                )
            )
    figures: dict[str, object] = {"prune_target_share": PRUNE.share}
    for name, part_is_tune in (("_tune", True), ("_holdout", False)):
        chosen = [r for r in rows if r[0] is part_is_tune]
        before = [r for r in chosen if r[2]]
        figures[f"prune_token_share{name}"] = rounded(statistics.median(r[1] for r in chosen), 3)
        figures[f"prune_answer_retention{name}"] = (
            rounded(sum(r[3] for r in before) / len(before), 3) if before else None
        )
    figures["prune_token_share"] = figures["prune_token_share_holdout"]
    figures["prune_answer_retention"] = figures["prune_answer_retention_holdout"]
    # scoring is a prefill of the whole text; pruning saves the prefill of what it drops
    figures["prune_scoring_over_saving"] = rounded(
        statistics.median(r[6] / max(r[5], 1) for r in rows), 2
    )
    figures["prune_scoring_ms_median"] = rounded(statistics.median(r[4] for r in rows) * 1000, 1)
    log(f"tokens: {figures}")
    return figures


# --- protected spans ---------------------------------------------------------------------------


def _spans(count: Count, ratio: float, *, quick: bool) -> dict[str, object]:
    prompts = protected_prompts(seed=7, count=20 if quick else 100)
    found = 0
    reductions = []
    for case in prompts:
        out, _ = compress_text(case.text, count, ratio)
        problems = violations(case, out)
        if problems:
            log(f"protected-span violations: {problems}")
        found += len(problems)
        reductions.append(count(case.text) / max(count(out), 1))
    return {
        "protected_span_violations": found,
        "protected_span_prompts": len(prompts),
        "protected_span_prompts_reduction_median": rounded(statistics.median(reductions), 3),
    }


# --- end to end --------------------------------------------------------------------------------


def long_prompt(
    record: hotpot.Record, others: list[hotpot.Record], count: Count, nonce: str, question: str
) -> str:
    """The record's paragraphs and others' (in a fixed order) to 2,000+ tokens."""
    padding: list[tuple[str, list[str]]] = []
    for other in others:
        text = hotpot.prompt(record, padding=padding)
        if count(text) >= LONG_PROMPT_TOKENS + 100:
            break
        padding.extend(other.paragraphs)
    base = hotpot.Record(record.id, question, record.answer, record.paragraphs, [])
    return f"Request {nonce}. " + hotpot.prompt(base, padding=padding)


def _e2e(
    urls: list[str],
    records: list[hotpot.Record],
    count: Count,
    args: argparse.Namespace,
    tokenizer_dir: Path | None,
) -> dict[str, object]:
    n = args.records or (4 if args.quick else len(records))
    rng = random.Random(args.seed)
    chosen = rng.sample(records, min(n + 1, len(records)))
    env = tokenizer_env(tokenizer_dir)
    with tempfile.TemporaryDirectory() as folder:
        policy = Path(folder) / "compress.yaml"
        policy.write_text(POLICY % args.ratio)
        with spawn_proxy(urls, policy=policy, env=env) as proxy, httpx.Client(timeout=900) as http:
            _wait_calibrated(http, proxy.url, hotpot.prompt(chosen[0]))
            rows = []
            for index, record in enumerate(chosen):
                others = [r for r in records if r.id != record.id]
                other_question = others[index % len(others)].question
                row = _pair(
                    http, urls[0], proxy.url, record, others, count, other_question, args, index
                )
                if index:  # the first record is the warm-up
                    rows.append(row)
    return _e2e_figures(rows)


def _wait_calibrated(http: httpx.Client, url: str, sample: str) -> None:
    """Wait for the proxy's backend profile (calibrated in the background at start-up),
    so that the cost check runs on measured speeds."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        _, header = _ask(http, url, f"Request {uuid.uuid4().hex[:12]}. {sample}", 1)
        if "uncalibrated" not in header:
            return
        time.sleep(2)
    raise BenchError("the proxy's backend profile did not calibrate within 300 s")


def _ask(http: httpx.Client, url: str, content: str, max_tokens: int) -> tuple[float, str]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    started = time.perf_counter()
    response = http.post(f"{url}/v1/chat/completions", json=body)
    took = time.perf_counter() - started
    if response.status_code != 200:
        raise BenchError(f"{url}: {response.status_code} {response.text[:300]}")
    return took, response.headers.get(HEADER, "")


def _pair(
    http: httpx.Client,
    direct: str,
    proxy: str,
    record: hotpot.Record,
    others: list[hotpot.Record],
    count: Count,
    second_question: str,
    args: argparse.Namespace,
    index: int,
) -> dict[str, Any]:
    arms = [("direct", direct), ("leangate", proxy)]
    if index % 2:
        arms.reverse()
    nonces = {name: uuid.uuid4().hex[:12] for name, _ in arms}
    row: dict[str, Any] = {"tokens": 0}
    for phase, question in (("cold", record.question), ("warm", second_question)):
        for name, url in arms:
            text = long_prompt(record, others, count, nonces[name], question)
            row["tokens"] = max(row["tokens"], count(text))
            took, header = _ask(http, url, text, args.max_tokens)
            row[f"{phase}_{name}"] = took
            if name == "leangate":
                row[f"{phase}_header"] = header_fields(header)
    log(
        f"record {index}: {row['tokens']} tokens; cold direct {row['cold_direct']:.2f}s, "
        f"leangate {row['cold_leangate']:.2f}s; warm direct {row['warm_direct']:.2f}s, "
        f"leangate {row['warm_leangate']:.2f}s; cold {row['cold_header']}; "
        f"warm {row['warm_header']}"
    )
    return row


def _e2e_figures(rows: list[dict[str, Any]]) -> dict[str, object]:
    if not rows:
        return {}
    cold = [r["cold_direct"] / r["cold_leangate"] for r in rows]
    warm = [r["warm_direct"] / r["warm_leangate"] for r in rows]
    compressor = [float(r["cold_header"].get("ms", 0)) / 1000 for r in rows]
    saved = [
        r["cold_direct"] - (r["cold_leangate"] - c) for r, c in zip(rows, compressor, strict=True)
    ]
    before = [int(r["cold_header"].get("tokens_before", 0)) for r in rows]
    after = [int(r["cold_header"].get("tokens_after", 0) or 1) for r in rows]
    return {
        "e2e_speedup_long": rounded(statistics.median(cold), 3),
        "e2e_speedup_warm": rounded(statistics.median(warm), 3),
        "cost_share_of_prefill_saved": rounded(sum(compressor) / sum(saved), 4)
        if sum(saved) > 0
        else None,
        "e2e_prompt_tokens_median": statistics.median(r["tokens"] for r in rows),
        "e2e_token_reduction_median": rounded(
            statistics.median(b / a for b, a in zip(before, after, strict=True)), 3
        ),
        "e2e_compressed_share": rounded(
            sum(r["cold_header"].get("decision") == "compressed" for r in rows) / len(rows), 3
        ),
        "e2e_direct_cold_s_median": rounded(statistics.median(r["cold_direct"] for r in rows), 3),
        "e2e_leangate_cold_s_median": rounded(
            statistics.median(r["cold_leangate"] for r in rows), 3
        ),
        "e2e_records": len(rows),
        "e2e_compressor_ms_median": rounded(statistics.median(compressor) * 1000, 2),
        "e2e_compressor_ms_per_1k_tokens_median": rounded(
            statistics.median(c * 1e6 / b for c, b in zip(compressor, before, strict=True)), 2
        ),
        "e2e_max_tokens_ignore_eos": True,
        "e2e_cpu_count": os.cpu_count(),
    }
