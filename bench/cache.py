"""``leangate bench cache``: hit quality, hit latency, miss overhead and single-flight.

Four parts, each against a baseline measured in the same run:

1. *quality* (offline, no proxy), with the embedder, index and verifier the proxy uses
   (see :mod:`leangate.cache.semantic_eval`): GPTCache's ``mock_data.json`` (tune and held-out
   halves; 1,000 unrelated questions must miss) and Quora duplicate pairs (``qqp_tune.json``)
   split by duplicate cluster into a tuning part and a held-out part nobody tuned on, with
   cross-pair negatives. The QQP figures are given for the default verifier (``qqp_*``), the
   strict preset (``qqp_strict_*``) and a plain cosine threshold (``qqp_cosine_*``, chosen on
   the tuning part for precision 0.99), and that baseline's precision and recall on the
   held-out part at every threshold from 0.60 to 1.00 (``qqp_cosine_holdout_curve``).
   Absent data is named in ``quality_missing``.
2. *hits* (real vLLM, Redis): exact and semantic hits through the proxy, interleaved with
   the same requests sent directly to vLLM; p50s and the speed-up over direct.
3. *misses* (minimal responder, Redis): a proxy with the cache (exact, then exact plus
   semantic) against the same proxy with no stage, every request unique, interleaved; the
   added p50 is the cost of a miss.
4. *single-flight* (real vLLM): 50 identical concurrent requests; the backend calls counted
   from the proxy's ``/metrics``. Tenant isolation is checked on the way.

The cache stage runs with its default budget: ``*_stage_failed_open*`` count the requests on
which it gave up. Reads ``../shared/data`` (``--data-dir``); without it the hit timings use
built-in paraphrases.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import httpx

from leangate.cache.stage import EMBED_TIMING

if TYPE_CHECKING:
    from leangate.cache.semantic_eval import Prepared, Selector

from leangate.backend.localvllm import MODEL_NAME

from .common import (
    BenchError,
    RawHTTPClient,
    SpawnedService,
    add_common_arguments,
    backend_urls,
    log,
    machine_info,
    median,
    metric_total,
    percentile,
    ratio,
    resolve_rounds,
    rounded,
    spawn_proxy,
    spawn_responder,
)

T = TypeVar("T")
MODEL = MODEL_NAME  # the bundled model
RESPONDER_MODEL = "bench-model"
CHAT = "/v1/chat/completions"
CACHE_POLICY = """
rules:
  - name: bench
    stages:
      - use: cache
        settings: {namespace: "%s", semantic: %s}
"""
NO_STAGE_POLICY = "rules: [{name: bench, stages: []}]\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--data-dir", type=Path, default=None, help="default ../shared/data")
    parser.add_argument("--parts", default="quality,hits,misses,singleflight")


def run(args: argparse.Namespace) -> dict[str, object]:
    from leangate.cache.semantic_eval import default_data_dir

    parts = set(args.parts.split(","))
    data_dir = args.data_dir or default_data_dir()
    if not args.redis_url:
        raise BenchError("this benchmark needs Redis: pass --redis-url or set REDIS_URL")
    rounds = resolve_rounds(args, quick=3, full=7)
    result: dict[str, object] = {"benchmark": "cache", "quick": bool(args.quick)}
    started = time.perf_counter()
    if "quality" in parts:
        result.update(_quality(data_dir, quick=args.quick))
    with TemporaryPolicies() as policies:
        if parts & {"hits", "singleflight"}:
            with backend_urls(args) as urls:
                if "hits" in parts:
                    result.update(_hits(urls[0], args.redis_url, policies, data_dir, rounds))
                if "singleflight" in parts:
                    result.update(_singleflight(urls[0], args.redis_url, policies))
        if "misses" in parts:
            result.update(_misses(args.redis_url, policies, rounds, quick=args.quick))
    result["duration_s"] = round(time.perf_counter() - started, 1)
    result["machine"] = machine_info()
    return result


class TemporaryPolicies(ExitStack):
    """Policy files written for one run, each with a namespace no earlier run used."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(self.enter_context(tempfile.TemporaryDirectory()))

    def cache(self, *, semantic: bool) -> Path:
        path = self.dir / f"cache-{uuid.uuid4().hex[:8]}.yaml"
        path.write_text(CACHE_POLICY % (f"bench-{uuid.uuid4().hex}", str(semantic).lower()))
        return path

    def no_stage(self) -> Path:
        path = self.dir / "none.yaml"
        path.write_text(NO_STAGE_POLICY)
        return path


# --- 1. quality ------------------------------------------------------------------------------


def _quality(data_dir: Path, *, quick: bool) -> dict[str, object]:
    """Hit quality on every evaluation set whose data is present; what is absent is named in
    ``quality_missing`` and its keys are left out."""
    from leangate.cache import semantic_eval as se
    from leangate.cache.embedder import Embedder

    missing: list[str] = []
    mock_pairs = _load(missing, se.load_gptcache_pairs, data_dir.joinpath(*se.MOCK_FILE))
    unrelated = _load(missing, se.load_unrelated_questions, data_dir, 300 if quick else 1000)
    qqp_pairs = _load(missing, se.load_gptcache_pairs, data_dir.joinpath(*se.QQP_FILE))
    sets: list[se.EvalSet] = []
    if mock_pairs is not None:
        sets.append(se.mock_eval_set(mock_pairs, unrelated or []))
    if qqp_pairs is not None:
        qqp = se.qqp_eval_sets(qqp_pairs, sample=QQP_QUICK_SAMPLE if quick else 1.0)
        sets += [qqp["tune"], qqp["holdout"]]
    result: dict[str, object] = {"quality_missing": missing}
    if not sets:
        return result
    embedder = Embedder()
    embedder.load()
    texts = [t for s in sets for t in (*s.entries, *(q.text for q in s.queries))]
    log(f"quality: embedding {len(set(texts))} texts")
    embeddings = se.embed_texts(embedder, texts)
    prepared = {s.name: se.prepare(embeddings, s) for s in sets}
    if "mock" in prepared:
        result.update(_mock_figures(prepared["mock"], with_unrelated=unrelated is not None))
    if "qqp-tune" in prepared:
        result.update(_qqp_figures(prepared["qqp-tune"], prepared["qqp-holdout"]))
    return result


QQP_QUICK_SAMPLE = 0.25
COSINE_TARGET_PRECISION = 0.99


def _load(missing: list[str], loader: Callable[..., T], *args: object) -> T | None:
    from leangate.cache.semantic_eval import EvalDataError

    try:
        return loader(*args)
    except EvalDataError as exc:
        log(f"quality: skipped, {exc}")
        missing.append(str(exc))
        return None


def _mock_figures(prepared: Prepared, *, with_unrelated: bool) -> dict[str, object]:
    from leangate.cache.semantic_eval import score
    from leangate.cache.verify import Verifier

    report = score(prepared, Verifier())
    log(report.summary())
    tune, held, whole = (report.splits[s] for s in ("tune", "holdout", "all"))
    figures: dict[str, object] = {
        "semantic_precision": rounded(held.precision),
        "semantic_recall": rounded(held.recall),
        "semantic_precision_all": rounded(whole.precision),
        "semantic_recall_all": rounded(whole.recall),
        "semantic_precision_tune": rounded(tune.precision),
        "semantic_recall_tune": rounded(tune.recall),
        "verify_p50_us": rounded(held.p50_verify_us, 1),
    }
    if with_unrelated:
        figures["unrelated_false_hits"] = whole.unrelated_false_hits
        figures["unrelated_questions"] = whole.n_unrelated
    return figures


def _qqp_figures(tune: Prepared, holdout: Prepared) -> dict[str, object]:
    """The default verifier, the strict preset, the rules without the pair model and the
    cosine baseline, each on both parts.

    The baseline's threshold is the lowest reaching precision 0.99 on the tuning part.
    """
    from leangate.cache.semantic_eval import CosineThreshold, choose_threshold, score
    from leangate.cache.verify import RULES_ONLY, STRICT, Verifier

    threshold = choose_threshold(tune, COSINE_TARGET_PRECISION)
    arms: dict[str, Selector] = {
        "qqp": Verifier(),
        "qqp_strict": Verifier(STRICT),
        "qqp_rules": Verifier(RULES_ONLY),
        "qqp_cosine": CosineThreshold(threshold),
    }
    figures: dict[str, object] = {"qqp_cosine_threshold": rounded(threshold)}
    for prefix, selector in arms.items():
        for part, prepared in (("tune", tune), ("holdout", holdout)):
            report = score(prepared, selector, holdout=part == "holdout")
            log(f"[{prefix}] {report.summary()}")
            m = report.splits[part]
            figures[f"{prefix}_{part}_precision"] = rounded(m.precision)
            figures[f"{prefix}_{part}_recall"] = rounded(m.recall)
            figures[f"{prefix}_{part}_cross_false_hit_rate"] = rounded(m.cross_false_hit_rate)
    figures["qqp_cross_false_hit_rate"] = figures["qqp_holdout_cross_false_hit_rate"]
    figures["qqp_cosine_holdout_curve"] = cosine_curve(holdout)
    held = holdout.lookups
    figures["qqp_holdout_paraphrases"] = sum(lk.query.kind == "paraphrase" for lk in held)
    figures["qqp_holdout_cross_negatives"] = sum(lk.query.kind == "cross" for lk in held)
    figures["qqp_holdout_entries"] = holdout.n_entries
    return figures


CURVE_THRESHOLDS = tuple(round(0.6 + 0.01 * step, 2) for step in range(41))
"""0.60 to 1.00: below 0.6 a plain cosine serves nearly every neighbour on QQP."""


def cosine_curve(
    holdout: Prepared, thresholds: Sequence[float] = CURVE_THRESHOLDS
) -> list[dict[str, float]]:
    """Precision and recall of a plain cosine threshold on the held-out part, threshold by
    threshold: the trade-off any single threshold picks one point of, which the verifier's
    figures (``qqp_holdout_*``) are read against. Replayed over the neighbours already
    searched, so it costs no embedding."""
    from leangate.cache.semantic_eval import CosineThreshold, score

    points: list[dict[str, float]] = []
    for threshold in thresholds:
        held = score(holdout, CosineThreshold(threshold), holdout=True).splits["holdout"]
        points.append(
            {
                "threshold": threshold,
                "precision": rounded(held.precision),
                "recall": rounded(held.recall),
                "cross_false_hit_rate": rounded(held.cross_false_hit_rate),
                "hits": held.hits,
            }
        )
    return points


# --- 2. hits ---------------------------------------------------------------------------------


def _body(question: str, model: str = MODEL, max_tokens: int = 16) -> bytes:
    return json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
    ).encode()


def _cache_status(proxy: SpawnedService, body: bytes, key: str | None = None) -> str:
    """The ``x-leangate-cache`` header of one request; without a key the tenant is the
    anonymous one, as for the timed requests."""
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    response = httpx.post(proxy.url + CHAT, content=body, headers=headers, timeout=120)
    if response.status_code != 200:
        raise BenchError(f"proxy answered {response.status_code}: {response.text[:200]}")
    return str(response.headers.get("x-leangate-cache", ""))


@dataclass(frozen=True)
class Timing:
    latency: float
    embed: float
    """The proxy's own embedding time for this request (its ``Server-Timing``), or 0."""

    @property
    def net(self) -> float:
        return self.latency - self.embed


def _timed(client: RawHTTPClient, requests: Sequence[bytes]) -> list[Timing]:
    times = []
    for request in requests:
        start = time.perf_counter()
        response = client.send(request)
        latency = time.perf_counter() - start
        if response.status != 200:
            raise BenchError(f"HTTP {response.status}: {response.body[:200]!r}")
        times.append(Timing(latency, _embed_seconds(response.headers.get(b"server-timing", b""))))
    return times


def _embed_seconds(server_timing: bytes) -> float:
    for metric in server_timing.decode().split(","):
        name, _, duration = metric.strip().partition(";dur=")
        if name == EMBED_TIMING:
            return float(duration) / 1000
    return 0.0


def _p50(times: Sequence[Timing], field: str = "latency") -> float:
    return median([getattr(t, field) for t in times])


# Used for the hit timings when mock_data.json is absent (written for this benchmark).
FALLBACK_HIT_PAIRS = [
    ("How do I reverse a list in Python?", "How can I reverse a Python list?"),
    (
        "What is the boiling point of water at sea level?",
        "At sea level, what temperature does water boil at?",
    ),
    ("How do I center a div with CSS?", "How can I center a div using CSS?"),
    ("What does HTTP status code 404 mean?", "What is the meaning of HTTP status code 404?"),
    ("How do I make a cup of green tea?", "How should I make a cup of green tea?"),
    ("Why is the sky blue?", "Why does the sky look blue?"),
]


def _hit_pairs(data_dir: Path, count: int) -> list[tuple[str, str]]:
    from leangate.cache.semantic_eval import EvalDataError, load_gptcache_pairs, split_of

    try:
        pairs = load_gptcache_pairs(data_dir / "gptcache" / "mock_data.json")
    except EvalDataError as exc:
        log(f"hits: {exc}; timing the built-in paraphrases instead")
        return FALLBACK_HIT_PAIRS[:count]
    held = [(p.origin, p.similar) for p in pairs if split_of(p.origin) == "holdout"]
    return held[:count]


def _hits(
    backend: str, redis_url: str, policies: TemporaryPolicies, data_dir: Path, rounds: int
) -> dict[str, object]:
    with spawn_proxy([backend], policy=policies.cache(semantic=True), redis_url=redis_url) as proxy:
        origin = _body("In one sentence, what is a cache?")
        _cache_status(proxy, origin)
        if _cache_status(proxy, origin) != "hit-exact":
            raise BenchError("the repeated request was not an exact hit")
        similar = _semantic_hits(proxy, data_dir)
        log(f"hits: {len(similar)} paraphrases hit semantically")
        raw = RawHTTPClient(proxy.url)
        direct = RawHTTPClient(backend)
        exact_requests = [raw.build_request("POST", CHAT, origin)] * 50
        semantic_requests = [raw.build_request("POST", CHAT, _body(q)) for q in similar]
        direct_requests = [direct.build_request("POST", CHAT, origin)] * 3
        samples: dict[str, list[Timing]] = {"direct": [], "exact": [], "semantic": []}
        round_p50: dict[str, list[float]] = {"direct": [], "exact": [], "semantic": []}
        for index in range(-1, rounds):
            for arm, client, requests in (
                ("direct", direct, direct_requests),
                ("exact", raw, exact_requests),
                ("semantic", raw, semantic_requests),
            ):
                times = _timed(client, requests) if requests else []
                if index >= 0 and times:
                    samples[arm] += times
                    round_p50[arm].append(_p50(times))
            log(f"hits round {index}: {_p50s_ms(round_p50)}")
        raw.close()
        direct.close()
        failed_open = _failed_open(proxy)
        semantic_now = [_cache_status(proxy, _body(q)) for q in similar]
        if _cache_status(proxy, origin) != "hit-exact":
            raise BenchError("the timed exact request is no longer an exact hit")
    direct_p50 = median(round_p50["direct"])
    exact_p50 = median(round_p50["exact"])
    semantic_p50 = median(round_p50["semantic"])
    latencies = {arm: [t.latency for t in times] for arm, times in samples.items()}
    return {
        "semantic_embed_p50_ms": rounded(_p50(samples["semantic"], "embed") * 1e3, 2),
        "semantic_hit_minus_embed_p50_ms": rounded(_p50(samples["semantic"], "net") * 1e3, 2),
        "direct_vllm_p50_ms": rounded(direct_p50 * 1e3, 2),
        "exact_hit_p50_ms": rounded(exact_p50 * 1e3, 3),
        "exact_hit_p99_ms": rounded(percentile(latencies["exact"], 99) * 1e3, 3),
        "semantic_hit_p50_ms": rounded(semantic_p50 * 1e3, 3),
        "semantic_hit_p99_ms": rounded(percentile(latencies["semantic"], 99) * 1e3, 3),
        "exact_hit_speedup_vs_direct": rounded(ratio(direct_p50, exact_p50), 1),
        "semantic_hit_speedup_vs_direct": rounded(ratio(direct_p50, semantic_p50), 1),
        "semantic_hit_queries": len(similar),
        "semantic_hit_recheck_misses": sum(status != "hit-semantic" for status in semantic_now),
        "hits_stage_failed_open": failed_open,
    }


def _semantic_hits(proxy: SpawnedService, data_dir: Path) -> list[str]:
    """Cache some held-out origins, and keep the paraphrases that then hit."""
    pairs = _hit_pairs(data_dir, 12)
    for origin, _ in pairs:
        _cache_status(proxy, _body(origin))
    time.sleep(0.5)
    return [
        similar for _, similar in pairs if _cache_status(proxy, _body(similar)) == "hit-semantic"
    ]


# --- 3. misses -------------------------------------------------------------------------------


def _unique_requests(client: RawHTTPClient, count: int) -> Iterator[bytes]:
    for _ in range(count):
        question = f"Question {uuid.uuid4().hex}: how do caches work?"
        yield client.build_request("POST", CHAT, _body(question, RESPONDER_MODEL, 8))


def _misses(
    redis_url: str, policies: TemporaryPolicies, rounds: int, *, quick: bool
) -> dict[str, object]:
    count = 150 if quick else 400
    with ExitStack() as stack:
        responder = stack.enter_context(spawn_responder(model=RESPONDER_MODEL))
        arms = {
            "none": stack.enter_context(spawn_proxy([responder.url], policy=policies.no_stage())),
            "exact": stack.enter_context(
                spawn_proxy(
                    [responder.url], policy=policies.cache(semantic=False), redis_url=redis_url
                )
            ),
            "semantic": stack.enter_context(
                spawn_proxy(
                    [responder.url],
                    policy=policies.cache(semantic=True),
                    redis_url=redis_url,
                    startup_timeout_s=120,
                )
            ),
        }
        clients = {
            name: stack.enter_context(RawHTTPClient(proxy.url)) for name, proxy in arms.items()
        }
        p50s: dict[str, list[float]] = {name: [] for name in arms}
        net_p50s: list[float] = []
        embeds: list[float] = []
        for index in range(-1, rounds):
            for name, client in clients.items():
                times = _timed(client, list(_unique_requests(client, count)))
                if index >= 0:
                    p50s[name].append(_p50(times))
                if index >= 0 and name == "semantic":
                    net_p50s.append(_p50(times, "net"))
                    embeds.append(_p50(times, "embed"))
            log(f"misses round {index}: {_p50s_ms(p50s)}")
        failed_open = {name: _failed_open(arms[name]) for name in ("exact", "semantic")}
    semantic_added = _paired_added(p50s["semantic"], p50s["none"])
    return {
        "miss_embed_p50_ms": rounded(median(embeds) * 1e3, 2),
        "miss_overhead_semantic_minus_embed_p50_ms": rounded(
            _paired_added(net_p50s, p50s["none"]) * 1e3, 2
        ),
        "no_cache_p50_ms": rounded(median(p50s["none"]) * 1e3, 3),
        "miss_overhead_p50_ms": rounded(_paired_added(p50s["exact"], p50s["none"]) * 1e3, 3),
        "miss_overhead_semantic_p50_ms": rounded(semantic_added * 1e3, 3),
        "misses_stage_failed_open_exact": failed_open["exact"],
        "misses_stage_failed_open_semantic": failed_open["semantic"],
    }


def _paired_added(arm: list[float], baseline: list[float]) -> float:
    """Median over rounds of the arm's p50 minus the baseline's p50 in the same round."""
    return median([a - b for a, b in zip(arm, baseline, strict=True)])


def _p50s_ms(p50s: dict[str, list[float]]) -> str:
    return ", ".join(f"{arm} {median(v) * 1e3:.2f} ms" for arm, v in p50s.items() if v)


# --- 4. single-flight and tenants --------------------------------------------------------------


def _singleflight(backend: str, redis_url: str, policies: TemporaryPolicies) -> dict[str, object]:
    with spawn_proxy(
        [backend], policy=policies.cache(semantic=False), redis_url=redis_url
    ) as proxy:
        body = json.loads(
            _body(f"Explain rain to a child ({uuid.uuid4().hex[:6]}).", max_tokens=32)
        )
        body["ignore_eos"] = True
        before = _backend_requests(proxy)
        statuses = asyncio.run(_burst(proxy.url, body, 50))
        calls = _backend_requests(proxy) - before
        leaks = sum(_leaks_to_another_tenant(proxy, f"Tenant probe {i}.") for i in range(5))
    log(
        f"single-flight: 50 identical requests, {calls:.0f} backend call(s), "
        f"statuses {set(statuses)}"
    )
    return {
        "singleflight_requests": len(statuses),
        "singleflight_backend_calls": int(calls),
        "singleflight_errors": sum(s != 200 for s in statuses),
        "tenant_leaks": leaks,
    }


def _leaks_to_another_tenant(proxy: SpawnedService, question: str) -> bool:
    body = _body(question)
    _cache_status(proxy, body, "tenant-a")
    if _cache_status(proxy, body, "tenant-a") != "hit-exact":
        raise BenchError("tenant probe: the repeated request was not an exact hit")
    return _cache_status(proxy, body, "tenant-b") != "miss"


async def _burst(url: str, body: dict[str, object], count: int) -> list[int]:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        calls = [client.post(url + CHAT, json=body) for _ in range(count)]
        return [r.status_code for r in await asyncio.gather(*calls)]


def _backend_requests(proxy: SpawnedService) -> float:
    return metric_total(proxy.url, "leangate_backend_requests_total")


def _failed_open(proxy: SpawnedService) -> int:
    """Requests on which the cache stage failed open (an error or its default budget over)."""
    return int(metric_total(proxy.url, "leangate_stage_failed_open_total"))
