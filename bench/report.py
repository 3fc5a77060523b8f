"""The markdown report and PNG plots of ``leangate bench all``, from its saved results.

Pure functions of the results dict (``results.json``: each benchmark's last-line JSON with
its status, plus the machine and timestamps), so that a report can be rendered again from a
saved run without measuring anything (``leangate bench all --from-results``). matplotlib is
imported inside the drawing functions only: importing this module stays cheap, and the
proxy never depends on it.

Every plotted figure is a ratio against the baseline the same benchmark measured in the
same run (direct to the backend, unless a figure says otherwise); absolute times on a
shared 2-core machine say little, ratios taken minutes apart say more.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.container import BarContainer
    from matplotlib.figure import Figure

Results = Mapping[str, Any]
"""``results.json`` as loaded: ``machine``, ``command``, timestamps and ``benchmarks``
(name -> ``{"status", "reason", "result", ...}``)."""

REPORT_FILE = "report.md"
OK = "ok"


# --- reading the results ------------------------------------------------------------------------


def result_of(results: Results, name: str) -> Mapping[str, Any] | None:
    """The benchmark's last-line JSON when it ran to the end, else None."""
    entry = results.get("benchmarks", {}).get(name)
    if not entry or entry.get("status") != OK:
        return None
    found = entry.get("result")
    return found if isinstance(found, Mapping) else None


def number(result: Mapping[str, Any] | None, key: str) -> float | None:
    """A finite number under ``key``, else None (absent, null, NaN or not a number)."""
    if result is None:
        return None
    value = result.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def missing_data(result: Mapping[str, Any]) -> list[str]:
    """What a benchmark ran without: each names it under a key of its own."""
    found: list[str] = []
    for key in ("quality_missing", "missing_data", "data_missing"):
        value = result.get(key)
        if isinstance(value, list):
            found += [str(item) for item in value]
    return found


def format_value(value: float) -> str:
    """About three significant figures, thousands separated: the machine's noise is larger
    than any further digit."""
    if value == int(value) and abs(value) >= 1:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(abs(value) - 1) < 0.05:
        return f"{value:.3f}"  # ratios near 1 are read against goals like 1.02 and 0.97
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


# --- the headline table --------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    """A target a figure must reach, as the issues set it."""

    op: Literal[">=", "<=", "=="]
    value: float

    def met(self, value: float) -> bool:
        if self.op == ">=":
            return value >= self.value
        if self.op == "<=":
            return value <= self.value
        return value == self.value

    def text(self) -> str:
        symbol = {">=": "≥", "<=": "≤", "==": "="}[self.op]
        return f"{symbol} {self.value:g}"


@dataclass(frozen=True)
class Headline:
    """One row of the headline table: a figure of one benchmark, its goal, and the baseline
    measured in the same run, as a template over that benchmark's keys."""

    bench: str
    key: str
    label: str
    goal: Goal | None = None
    baseline: str = ""


HEADLINES: tuple[Headline, ...] = (
    Headline(
        "passthrough",
        "latency_ratio_c64",
        "p50 latency, leangate / direct, vLLM, c=64",
        Goal("<=", 1.02),
        "direct {direct_p50_ms_c64} ms, leangate {proxy_p50_ms_c64} ms",
    ),
    Headline(
        "passthrough",
        "throughput_ratio_c64",
        "throughput, leangate / direct, vLLM, c=64",
        Goal(">=", 0.97),
        "direct {direct_rps_c64} req/s, leangate {proxy_rps_c64} req/s",
    ),
    Headline(
        "passthrough",
        "added_p50_ms",
        "added p50 latency, c=1, ms",
        Goal("<=", 0.75),
        "minimal responder direct {direct_p50_ms} ms, via leangate {proxy_p50_ms} ms",
    ),
    Headline(
        "passthrough",
        "proxy_cpu_us_per_request",
        "proxy CPU per plain request, µs",
        Goal("<=", 300),
    ),
    Headline(
        "passthrough",
        "capacity_ratio_c64",
        "max throughput c=64, leangate / bare relay",
        Goal(">=", 0.9),
        "bare relay {capacity_rps_c64_relay} req/s, leangate {capacity_rps_c64_proxy} req/s",
    ),
    Headline(
        "profile",
        "prediction_median_abs_error",
        "backend-profile prediction error, median",
        Goal("<=", 0.25),
        "measured direct requests ({prediction_requests})",
    ),
    Headline(
        "profile",
        "fanout_speedup_vs_sequential",
        "8 sub-requests at once, speed-up over one after another",
        Goal(">=", 2),
        "the same 8 sent direct one after another",
    ),
    Headline(
        "cache",
        "exact_hit_speedup_vs_direct",
        "exact hit, speed-up over direct vLLM",
        None,
        "direct {direct_vllm_p50_ms} ms, hit {exact_hit_p50_ms} ms",
    ),
    Headline(
        "cache",
        "semantic_hit_p50_ms",
        "semantic hit p50, ms",
        Goal("<=", 12),
        "direct {direct_vllm_p50_ms} ms ({semantic_hit_speedup_vs_direct}x)",
    ),
    Headline(
        "cache",
        "miss_overhead_p50_ms",
        "miss overhead over no cache, ms",
        Goal("<=", 1),
        "proxy without the cache {no_cache_p50_ms} ms",
    ),
    Headline(
        "cache",
        "qqp_holdout_precision",
        "QQP held-out precision, default verifier",
        Goal(">=", 0.99),
        "plain cosine, threshold {qqp_cosine_threshold} from the tune part: "
        "{qqp_cosine_holdout_precision}",
    ),
    Headline(
        "cache",
        "qqp_holdout_recall",
        "QQP held-out recall, default verifier",
        Goal(">=", 0.85),
        "plain cosine, threshold {qqp_cosine_threshold} from the tune part: "
        "{qqp_cosine_holdout_recall}",
    ),
    Headline(
        "cache",
        "singleflight_backend_calls",
        "backend calls for 50 identical concurrent misses",
        Goal("==", 1),
        "50 requests",
    ),
    Headline(
        "compress",
        "token_reduction",
        "prompt tokens before / after, held out",
        Goal(">=", 4),
    ),
    Headline(
        "compress",
        "supporting_fact_retention",
        "gold supporting sentences kept, held out",
        Goal(">=", 0.95),
    ),
    Headline(
        "compress",
        "e2e_speedup_long",
        "end to end, 2,000+ token prompts, direct / leangate",
        Goal(">=", 3),
        "direct {e2e_direct_cold_s_median} s, leangate {e2e_leangate_cold_s_median} s",
    ),
    Headline(
        "compress",
        "e2e_speedup_warm",
        "the same context again, direct / leangate",
        Goal(">=", 1),
        "direct with its prefix warm",
    ),
    Headline(
        "compress",
        "conversation_token_reduction",
        "10-turn conversations, prompt tokens from turn 6, whole / sent, held out",
        Goal(">=", 3),
    ),
    Headline(
        "compress",
        "planted_fact_retention",
        "facts planted in early turns still in the prompt, held out",
        Goal(">=", 0.9),
    ),
    Headline(
        "compress",
        "prefix_cache_hit_ratio",
        "vLLM prefix-cache hit rate, leangate / whole conversation",
        Goal(">=", 0.9),
        "whole conversation direct: {e2e_hit_rate_direct}",
    ),
    Headline(
        "rag",
        "token_reduction",
        "context tokens, all 10 paragraphs / selected, held out",
        Goal(">=", 4),
    ),
    Headline(
        "rag",
        "supporting_fact_recall",
        "gold supporting sentences in the prompt, held out",
        Goal(">=", 0.95),
    ),
    Headline(
        "rag",
        "e2e_latency_ratio",
        "end to end, full context direct / selected via leangate",
        None,
        "full {e2e_full_s_median} s, selected {e2e_selected_s_median} s",
    ),
    Headline(
        "rag",
        "cost_share_of_prefill_saved",
        "stage time over the backend time it saved",
        Goal("<=", 0.05),
    ),
    Headline(
        "sot",
        "speedup_positive_median",
        "router-positive questions, direct / leangate",
        Goal(">=", 2.5),
        "direct vLLM, same questions, same max_tokens",
    ),
    Headline(
        "sot",
        "speedup_negative_median",
        "router-negative questions, direct / leangate",
        Goal(">=", 0.97),
        "direct vLLM, same questions, same max_tokens",
    ),
    Headline(
        "sot",
        "ttft_ratio",
        "streamed time to first token, SoT / direct",
        Goal("<=", 1.3),
    ),
    Headline(
        "sot",
        "router_accuracy",
        "router accuracy, nested 5-fold CV",
        Goal(">=", 0.8),
    ),
    Headline(
        "decompose",
        "solve_time_ratio",
        "4 independent steps, solve time / slowest step alone",
        Goal("<=", 1.5),
        "the steps one after another take {sequential_time_ratio}x the solve time",
    ),
    Headline(
        "decompose",
        "both_gold_recall",
        "both gold paragraphs in 3 picked, held out",
        Goal(">=", 0.85),
        "question alone {baseline_both_gold_recall}",
    ),
    Headline(
        "decompose",
        "accuracy",
        "GSM8K answers right",
        None,
        "direct {baseline_accuracy}; time ratio {accuracy_time_ratio}",
    ),
    Headline("load", "errors", "errors under load", Goal("==", 0)),
)


def fill(template: str, result: Mapping[str, Any]) -> str:
    """``template`` with the benchmark's numbers formatted in; "" when one is missing,
    so a half-filled baseline is never shown."""
    values: dict[str, str] = {}
    for _, field, _, _ in string.Formatter().parse(template):
        if field is None:
            continue
        found = number(result, field)
        if found is None:
            return ""
        values[field] = format_value(found)
    return template.format(**values)


def headline_rows(results: Results) -> list[list[str]]:
    """The rows of benchmarks that ran: figure, value, goal and whether it was met, and
    the baseline; a figure the run did not measure shows as "—"."""
    rows: list[list[str]] = []
    for spec in HEADLINES:
        result = result_of(results, spec.bench)
        if result is None:
            continue
        value = number(result, spec.key)
        goal = "reported" if spec.goal is None else spec.goal.text()
        if value is not None and spec.goal is not None:
            goal += " ✅" if spec.goal.met(value) else " ❌"
        shown = "—" if value is None else format_value(value)
        baseline = (fill(spec.baseline, result) if value is not None else "") or "—"
        rows.append([spec.bench, f"{spec.label} (`{spec.key}`)", shown, goal, baseline])
    return rows


HEADLINE_HEADER = ("benchmark", "figure", "value", "goal", "baseline, same run")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# --- plot data ----------------------------------------------------------------------------------


class NoData(Exception):
    """A plot's data is not in the results; the message says what is missing."""


def _need(results: Results, name: str) -> Mapping[str, Any]:
    found = result_of(results, name)
    if found is None:
        status = results.get("benchmarks", {}).get(name, {}).get("status", "not run")
        raise NoData(f"`{name}` has no result ({status})")
    return found


def _rows(result: Mapping[str, Any], key: str, bench: str) -> list[Mapping[str, Any]]:
    rows = result.get(key)
    if not isinstance(rows, list) or not rows:
        raise NoData(f"`{bench}` has no `{key}` (that part did not run, or an older version)")
    return [row for row in rows if isinstance(row, Mapping)]


LatencyBar = tuple[str, float]
"""A stage's label and its end-to-end latency ratio, leangate / direct (below 1: faster)."""

_LATENCY_SOURCES: tuple[tuple[str, str, Callable[[Mapping[str, Any]], float | None]], ...] = (
    ("passthrough", "passthrough c=1", lambda r: number(r, "latency_ratio_c1")),
    ("passthrough", "passthrough c=64", lambda r: number(r, "latency_ratio_c64")),
    (
        "cache",
        "cache exact hit",
        lambda r: _over(number(r, "exact_hit_p50_ms"), number(r, "direct_vllm_p50_ms")),
    ),
    (
        "cache",
        "cache semantic hit",
        lambda r: _over(number(r, "semantic_hit_p50_ms"), number(r, "direct_vllm_p50_ms")),
    ),
    ("compress", "compress, cold", lambda r: _inverse(number(r, "e2e_speedup_long"))),
    ("compress", "compress, warm", lambda r: _inverse(number(r, "e2e_speedup_warm"))),
    ("rag", "rag", lambda r: _inverse(number(r, "e2e_latency_ratio"))),
    ("sot", "sot, router-positive", lambda r: _inverse(number(r, "speedup_positive_median"))),
    ("sot", "sot, router-negative", lambda r: _inverse(number(r, "speedup_negative_median"))),
    ("decompose", "decompose (GSM8K)", lambda r: number(r, "accuracy_time_ratio")),
)


def _over(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _inverse(value: float | None) -> float | None:
    return _over(1.0, value)


def latency_bars(results: Results) -> list[LatencyBar]:
    """Each stage's end-to-end time over direct-to-backend time, from the figure its
    benchmark reports (speed-ups inverted, so that every bar reads the same way)."""
    bars: list[LatencyBar] = []
    for bench, label, extract in _LATENCY_SOURCES:
        result = result_of(results, bench)
        value = None if result is None else extract(result)
        if value is not None and value > 0:
            bars.append((label, value))
    if not bars:
        raise NoData("no benchmark with an end-to-end time against direct ran")
    return bars


def token_bars(results: Results) -> list[tuple[str, float]]:
    """Prompt or context tokens before over after, per stage and part (held out, tune)."""
    sources = (
        ("compress", "compress, held out", "token_reduction_holdout"),
        ("compress", "compress, tune", "token_reduction_tune"),
        ("compress", "compress, end to end", "e2e_token_reduction_median"),
        ("rag", "rag, held out", "token_reduction_holdout"),
        ("rag", "rag, tune", "token_reduction_tune"),
    )
    bars = [
        (label, value)
        for bench, label, key in sources
        if (value := number(result_of(results, bench), key)) is not None and value > 0
    ]
    if not bars:
        raise NoData("neither `compress` nor `rag` measured a token reduction")
    return bars


@dataclass(frozen=True)
class CacheCurve:
    """The plain-cosine curve on QQP's held-out part, and the verifiers' points on it."""

    thresholds: list[float]
    precision: list[float]
    recall: list[float]
    points: dict[str, tuple[float, float]]
    """label -> (recall, precision) of the default verifier, the strict preset and the
    threshold chosen on the tune part."""


def cache_curve(results: Results) -> CacheCurve:
    result = _need(results, "cache")
    rows = _rows(result, "qqp_cosine_holdout_curve", "cache")
    curve = [
        (float(row["threshold"]), float(row["precision"]), float(row["recall"]))
        for row in rows
        if all(number(row, key) is not None for key in ("threshold", "precision", "recall"))
    ]
    points: dict[str, tuple[float, float]] = {}
    for label, prefix in (
        ("default verifier", "qqp_holdout"),
        ("strict verifier", "qqp_strict_holdout"),
        ("cosine chosen on tune part", "qqp_cosine_holdout"),
    ):
        recall, precision = (
            number(result, f"{prefix}_recall"),
            number(result, f"{prefix}_precision"),
        )
        if recall is not None and precision is not None:
            points[label] = (recall, precision)
    return CacheCurve([c[0] for c in curve], [c[1] for c in curve], [c[2] for c in curve], points)


def sot_categories(results: Results) -> list[tuple[str, float, int]]:
    """(category, median speed-up direct / leangate, questions) per question category."""
    rows = _rows(_need(results, "sot"), "by_category", "sot")
    found = [
        (str(row["category"]), speedup, int(row.get("questions", 0)))
        for row in rows
        if (speedup := number(row, "speedup_median")) is not None
    ]
    if not found:
        raise NoData("`sot` measured no category")
    return found


def passthrough_concurrency(results: Results) -> list[tuple[int, float, float]]:
    """(concurrency, p50 latency ratio, throughput ratio), leangate / direct vLLM."""
    rows = _rows(_need(results, "passthrough"), "by_concurrency", "passthrough")
    found = [
        (int(row["concurrency"]), latency, throughput)
        for row in rows
        if (latency := number(row, "latency_ratio")) is not None
        and (throughput := number(row, "throughput_ratio")) is not None
    ]
    if not found:
        raise NoData("`passthrough` measured no concurrency against vLLM")
    return sorted(found)


# --- drawing ------------------------------------------------------------------------------------


def _figure(width: float = 7.0, height: float = 4.0) -> tuple[Figure, Axes]:
    """A figure on the Agg canvas directly, not through pyplot: no global state, no
    display, and nothing to close."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _save(figure: Figure, path: Path) -> None:
    # No software/date metadata: the same results render to the same bytes.
    figure.savefig(path, format="png", metadata={"Software": None})


def _label_bars(axes: Axes, bars: BarContainer, values: Sequence[float], suffix: str = "") -> None:
    """Each bar's figure above it, as the report's tables write it."""
    axes.bar_label(bars, [format_value(value) + suffix for value in values], fontsize=8)


NOISE = 0.02
"""Ratios within 2% of 1 are drawn grey: on this machine that is run-to-run noise."""


def _ratio_color(value: float, *, lower_is_better: bool) -> str:
    if abs(value - 1.0) <= NOISE:
        return "tab:gray"
    return "tab:green" if (value < 1.0) == lower_is_better else "tab:red"


def draw_latency(bars: Sequence[LatencyBar], path: Path) -> None:
    figure, axes = _figure(8.0, 4.2)
    labels = [label for label, _ in bars]
    values = [value for _, value in bars]
    drawn = axes.bar(labels, values, color=[_ratio_color(v, lower_is_better=True) for v in values])
    axes.set_yscale("log")
    axes.axhline(1.0, color="black", linewidth=1, linestyle="--", label="direct to the backend")
    axes.set_ylabel("end-to-end time, leangate / direct (log)")
    axes.set_title("Latency ratio by stage (below 1: faster than direct)")
    axes.tick_params(axis="x", labelrotation=30, labelsize=8)
    axes.legend(fontsize=8)
    _label_bars(axes, drawn, values)
    _save(figure, path)


def draw_tokens(bars: Sequence[tuple[str, float]], path: Path) -> None:
    figure, axes = _figure()
    labels = [label for label, _ in bars]
    saved = [100.0 * (1.0 - 1.0 / value) for _, value in bars]
    drawn = axes.bar(labels, saved, color="tab:blue")
    axes.axhline(75.0, color="black", linewidth=1, linestyle="--", label="goal: 4x (75% saved)")
    axes.set_ylim(0, 100)
    axes.set_ylabel("tokens saved, % of the full prompt")
    axes.set_title("Tokens saved (full prompt / what is sent)")
    axes.tick_params(axis="x", labelrotation=20, labelsize=8)
    axes.legend(fontsize=8, loc="lower right")
    _label_bars(axes, drawn, [value for _, value in bars], "x")
    _save(figure, path)


def draw_cache_curve(curve: CacheCurve, path: Path) -> None:
    figure, axes = _figure(6.5, 4.8)
    axes.plot(curve.recall, curve.precision, marker=".", color="tab:gray", label="plain cosine")
    for threshold, recall, precision in zip(
        curve.thresholds, curve.recall, curve.precision, strict=True
    ):
        if round(threshold * 100) % 5 == 0:
            axes.annotate(f"{threshold:.2f}", (recall, precision), fontsize=7, color="tab:gray")
    for (label, (recall, precision)), marker in zip(curve.points.items(), "o^s", strict=False):
        axes.plot([recall], [precision], marker=marker, linestyle="none", label=label)
    axes.axhline(0.99, color="black", linewidth=0.8, linestyle="--")
    axes.axvline(0.85, color="black", linewidth=0.8, linestyle="--", label="goal ≥ 0.99 at ≥ 0.85")
    axes.set_xlim(0, 1)
    axes.set_xlabel("recall (paraphrases served their cluster's answer)")
    axes.set_ylabel("precision (served hits that were right)")
    axes.set_title("Cache precision against recall by cosine threshold, QQP held out")
    axes.legend(fontsize=8, loc="lower left")
    _save(figure, path)


def draw_sot(categories: Sequence[tuple[str, float, int]], path: Path) -> None:
    figure, axes = _figure()
    labels = [f"{name}\n({count})" for name, _, count in categories]
    values = [speedup for _, speedup, _ in categories]
    colors = [_ratio_color(v, lower_is_better=False) for v in values]
    drawn = axes.bar(labels, values, color=colors)
    axes.axhline(1.0, color="black", linewidth=1, linestyle="--", label="direct to the backend")
    axes.set_ylabel("median speed-up, direct / leangate")
    axes.set_title("SoT speed-up by question category (questions in brackets)")
    axes.tick_params(axis="x", labelsize=8)
    axes.legend(fontsize=8)
    _label_bars(axes, drawn, values, "x")
    _save(figure, path)


def draw_concurrency(points: Sequence[tuple[int, float, float]], path: Path) -> None:
    figure, axes = _figure()
    width = 0.38
    positions = list(range(len(points)))
    latency = [p[1] for p in points]
    throughput = [p[2] for p in points]
    left = [x - width / 2 for x in positions]
    right = [x + width / 2 for x in positions]
    latency_drawn = axes.bar(left, latency, width, label="p50 latency ratio")
    throughput_drawn = axes.bar(right, throughput, width, label="throughput ratio")
    axes.set_xticks(positions, [f"c={p[0]}" for p in points])
    axes.axhline(1.0, color="black", linewidth=1, linestyle="--")
    axes.axhline(1.02, color="tab:blue", linewidth=1, linestyle=":", label="latency goal ≤ 1.02")
    axes.axhline(
        0.97, color="tab:orange", linewidth=1, linestyle=":", label="throughput goal ≥ 0.97"
    )
    low = min([*latency, *throughput, 0.97])
    high = max([*latency, *throughput, 1.02])
    axes.set_ylim(low - 0.05, high + 0.05)
    axes.set_ylabel("leangate / direct vLLM")
    axes.set_title("Passthrough overhead by concurrency, leangate with no stage")
    axes.legend(fontsize=8)
    _label_bars(axes, latency_drawn, latency)
    _label_bars(axes, throughput_drawn, throughput)
    _save(figure, path)


@dataclass(frozen=True)
class Plot:
    """A plot of the report: its file, title, and how its data is read and drawn."""

    file: str
    title: str
    caption: str
    draw: Callable[[Results, Path], None]


def _plot(
    data: Callable[[Results], Any], draw: Callable[[Any, Path], None]
) -> Callable[[Results, Path], None]:
    return lambda results, path: draw(data(results), path)


PLOTS: tuple[Plot, ...] = (
    Plot(
        "latency_by_stage.png",
        "Latency ratio by stage",
        "Each stage's end-to-end time through leangate over the same requests sent direct "
        "to vLLM in the same run (medians; speed-ups inverted). Cache bars: a hit against "
        "a 16-token answer from vLLM.",
        _plot(latency_bars, draw_latency),
    ),
    Plot(
        "tokens_saved.png",
        "Tokens saved",
        "Prompt tokens (compress) or context tokens (rag) of the full prompt over those "
        "sent, with the served model's tokenizer; HotpotQA, tune and held-out parts.",
        _plot(token_bars, draw_tokens),
    ),
    Plot(
        "cache_precision_recall.png",
        "Cache precision against recall by threshold",
        "A plain cosine threshold swept from 0.60 to 1.00 on QQP's held-out part, with the "
        "default and strict verifiers and the threshold chosen on the tune part.",
        _plot(cache_curve, draw_cache_curve),
    ),
    Plot(
        "sot_by_category.png",
        "SoT speed-up by question category",
        "Median of direct / leangate (sot in auto mode) per question, both router groups; "
        "categories are Vicuna-80's, WizardLM's questions have none.",
        _plot(sot_categories, draw_sot),
    ),
    Plot(
        "passthrough_by_concurrency.png",
        "Passthrough overhead by concurrency",
        "p50 latency and throughput through leangate (no stage) over direct to vLLM, "
        "interleaved rounds, median of paired ratios.",
        _plot(passthrough_concurrency, draw_concurrency),
    ),
)


def render_plots(results: Results, out: Path) -> dict[str, str | None]:
    """Draw every plot whose data is there; file -> None when drawn, else why not. A plot
    left over from an earlier render is removed, so that the report never shows it."""
    outcome: dict[str, str | None] = {}
    for plot in PLOTS:
        path = out / plot.file
        path.unlink(missing_ok=True)
        try:
            plot.draw(results, path)
        except NoData as exc:
            outcome[plot.file] = str(exc)
        except (LookupError, TypeError, ValueError) as exc:
            # Malformed rows (an older benchmark's output, a hand-edited file) must not
            # cost the rest of a report that took an hour to measure.
            path.unlink(missing_ok=True)
            outcome[plot.file] = f"its data could not be drawn ({type(exc).__name__}: {exc})"
        else:
            outcome[plot.file] = None
    return outcome


# --- the markdown -------------------------------------------------------------------------------


def machine_line(machine: Mapping[str, Any]) -> str:
    """The machine in one line: processor, cores, memory, system, Python, load."""
    parts = [
        str(machine.get("cpu_model") or "unknown processor"),
        f"{machine.get('cpu_count', '?')} cores",
    ]
    if machine.get("memory_gib"):
        parts.append(f"{machine['memory_gib']} GiB")
    parts.append(str(machine.get("platform", "unknown system")))
    parts.append(f"Python {machine.get('python', '?')}")
    load = machine.get("loadavg_1m")
    if load is not None:
        parts.append(f"load average {load} at the start")
    return ", ".join(parts)


def backend_line(backend: Mapping[str, Any]) -> str:
    urls = ", ".join(backend.get("urls") or []) or "none"
    models = ", ".join(backend.get("models") or []) or "unknown model"
    version = backend.get("version")
    served = f"vLLM {version}" if version else "the backend"
    return f"{served} at {urls}, serving {models}"


def status_rows(results: Results) -> list[list[str]]:
    rows: list[list[str]] = []
    for name, entry in results.get("benchmarks", {}).items():
        seconds = entry.get("duration_s")
        load = (entry.get("result") or {}).get("machine", {}).get("loadavg_1m", "")
        rows.append(
            [
                name,
                str(entry.get("status", "?")),
                "" if seconds is None else format_value(float(seconds)),
                str(load),
                f"`{entry['log']}`" if entry.get("log") else "",
            ]
        )
    return rows


def problems(results: Results) -> list[str]:
    """Benchmarks that failed, timed out, were skipped, or ran without some data, and why."""
    lines: list[str] = []
    for name, entry in results.get("benchmarks", {}).items():
        status = entry.get("status")
        if status != OK:
            lines.append(f"- `{name}`: {status}: {entry.get('reason') or 'no reason given'}")
            continue
        missing = missing_data(entry.get("result") or {})
        if missing:
            lines.append(f"- `{name}`: ran without some data: {'; '.join(missing)}")
    return lines


def render_markdown(results: Results, plots: Mapping[str, str | None]) -> str:
    """The whole report: when and where it ran, the headline table, the plots, what did not
    run, and the command that reproduces it."""
    machine = results.get("machine", {})
    command = results.get("command", "leangate bench all")
    headline = headline_rows(results)
    sections = [
        "# leangate benchmark report",
        f"Run from {results.get('started_at', '?')} to {results.get('finished_at', '?')} "
        f"({format_value(float(results.get('duration_s') or 0))} s"
        f"{', quick sizes' if results.get('quick') else ''}).",
        f"**Machine:** {machine_line(machine)}.",
        f"**Backend:** {backend_line(results.get('backend', {}))}.",
        "Every figure is measured against a baseline taken in the same run, in interleaved "
        "rounds: direct to the backend unless the baseline column says otherwise. On a "
        "shared machine this small, read the ratios, not the absolute times.",
        "## Headline",
        markdown_table(HEADLINE_HEADER, headline) if headline else "No benchmark ran to the end.",
    ]
    for plot in PLOTS:
        sections.append(f"## {plot.title}")
        reason = plots.get(plot.file, "not rendered")
        if reason is None:
            sections += [f"![{plot.title}]({plot.file})", plot.caption]
        else:
            sections.append(f"No plot: {reason}.")
    sections += [
        "## Benchmarks",
        markdown_table(
            ["benchmark", "status", "seconds", "load (1 min) at its end", "log"],
            status_rows(results),
        ),
        "## Failed, skipped or incomplete",
        "\n".join(problems(results)) or "None: every benchmark ran with all its data.",
        "## Reproduce",
        f"```\n{command}\n```",
        "The raw figures of every benchmark are in `results.json` beside this report; "
        "`leangate bench all --from-results results.json --out DIR` renders it again.",
    ]
    return "\n\n".join(sections) + "\n"


def readme_snippet(results: Results, plot_path: str) -> str:
    """The headline table and the latency plot, for the project's README: the same rows as
    the report, with the image addressed from the README's folder."""
    headline = headline_rows(results)
    table = markdown_table(HEADLINE_HEADER, headline) if headline else "No benchmark ran."
    return (
        f"Measured by `{results.get('command', 'leangate bench all')}` on "
        f"{results.get('started_at', '?')}: {machine_line(results.get('machine', {}))}.\n\n"
        f"{table}\n\n![Latency ratio by stage]({plot_path})\n"
    )


def write_report(results: Results, out: Path) -> Path:
    """Render the plots and the markdown into ``out``; the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    plots = render_plots(results, out)
    path = out / REPORT_FILE
    path.write_text(render_markdown(results, plots))
    return path
