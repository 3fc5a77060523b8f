"""``leangate bench all`` and its report: the report generator on a small saved run, the
subprocess runner on stub commands, re-rendering through the CLI, and the extra keys the
benchmarks emit for the plots (computed here on hand-made data, without a backend)."""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from leangate.bench import all_benchmarks, report
from leangate.bench.cache import cosine_curve
from leangate.bench.common import BenchError
from leangate.bench.sot import by_category, question_categories
from leangate.cache.semantic_eval import Lookup, Prepared, Query
from leangate.cli import BENCHMARKS, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CPU = "Test CPU 9000 @ 2.00GHz"


def _passthrough() -> dict[str, Any]:
    return {
        "benchmark": "passthrough",
        "added_p50_ms": 0.22,
        "proxy_cpu_us_per_request": 207.0,
        "capacity_ratio_c64": 0.72,
        "capacity_rps_c64_proxy": 7934.0,
        "capacity_rps_c64_relay": 11045.0,
        "direct_p50_ms": 0.41,
        "proxy_p50_ms": 0.63,
        "latency_ratio_c1": 1.004,
        "latency_ratio_c64": 0.972,
        "throughput_ratio_c1": 0.996,
        "throughput_ratio_c64": 1.024,
        "direct_p50_ms_c64": 3010.0,
        "proxy_p50_ms_c64": 2925.0,
        "direct_rps_c64": 20.1,
        "proxy_rps_c64": 20.6,
        "by_concurrency": [
            {"concurrency": 1, "latency_ratio": 1.004, "throughput_ratio": 0.996},
            {"concurrency": 64, "latency_ratio": 0.972, "throughput_ratio": 1.024},
        ],
        "machine": {"loadavg_1m": 1.5},
    }


def _cache() -> dict[str, Any]:
    curve = [
        {"threshold": t, "precision": round(0.7 + 0.3 * (t - 0.6) / 0.4, 3), "recall": r}
        for t, r in ((0.6, 0.95), (0.7, 0.9), (0.8, 0.7), (0.9, 0.4), (1.0, 0.0))
    ]
    return {
        "benchmark": "cache",
        "quality_missing": [],
        "direct_vllm_p50_ms": 384.0,
        "exact_hit_p50_ms": 0.18,
        "semantic_hit_p50_ms": 5.9,
        "exact_hit_speedup_vs_direct": 2134.0,
        "semantic_hit_speedup_vs_direct": 65.1,
        "no_cache_p50_ms": 0.6,
        "miss_overhead_p50_ms": 0.16,
        "qqp_holdout_precision": 0.877,
        "qqp_holdout_recall": 0.697,
        "qqp_strict_holdout_precision": 0.972,
        "qqp_strict_holdout_recall": 0.299,
        "qqp_cosine_threshold": 0.986,
        "qqp_cosine_holdout_precision": 0.99,
        "qqp_cosine_holdout_recall": 0.068,
        "qqp_cosine_holdout_curve": curve,
        "singleflight_backend_calls": 1,
    }


def small_results() -> dict[str, Any]:
    """A saved run as ``bench all`` writes it: two benchmarks ran, one failed, one was not
    asked for, one ran without some of its data."""
    return {
        "schema": 1,
        "command": "leangate bench all --quick --only passthrough,cache,sot,compress",
        "quick": True,
        "started_at": "2026-12-01T10:00:00+00:00",
        "finished_at": "2026-12-01T10:05:00+00:00",
        "duration_s": 300.0,
        "machine": {
            "cpu_model": CPU,
            "cpu_count": 2,
            "memory_gib": 23.4,
            "platform": "Linux-6.18-x86_64",
            "python": "3.11.7",
            "loadavg_1m": 1.2,
        },
        "backend": {
            "urls": ["http://127.0.0.1:8000"],
            "models": ["SmolLM2-135M-Instruct"],
            "version": "0.32.0",
        },
        "benchmarks": {
            "passthrough": {"status": "ok", "result": _passthrough(), "duration_s": 70.2},
            "cache": {"status": "ok", "result": _cache(), "duration_s": 46.0},
            "compress": {
                "status": "ok",
                "result": {"benchmark": "compress", "missing_data": ["/data/hotpot.json"]},
            },
            "sot": {
                "status": "failed",
                "reason": "exit code 1: BenchError: ../shared/data/sot is missing",
                "result": None,
            },
            "load": {"status": "skipped", "reason": "optional: pass --with-load"},
        },
    }


def _pngs(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.glob("*.png")}


def test_the_report_of_a_small_run(tmp_path: Path) -> None:
    path = report.write_report(small_results(), tmp_path)
    text = path.read_text()
    assert path == tmp_path / "report.md"
    assert CPU in text and "2 cores" in text and "23.4 GiB" in text
    assert "vLLM 0.32.0 at http://127.0.0.1:8000, serving SmolLM2-135M-Instruct" in text
    # Headline rows: value, goal with its verdict, baseline filled from the same result.
    assert "| 0.972 | ≤ 1.02 ✅ | direct 3,010 ms, leangate 2,925 ms |" in text
    assert "| 0.72 | ≥ 0.9 ❌ | bare relay 11,045 req/s, leangate 7,934 req/s |" in text
    assert "| 0.877 | ≥ 0.99 ❌ | plain cosine, threshold 0.986 from the tune part: 0.990 |" in text
    assert "`sot`: failed: exit code 1: BenchError: ../shared/data/sot is missing" in text
    assert "`load`: skipped: optional: pass --with-load" in text
    assert "`compress`: ran without some data: /data/hotpot.json" in text
    assert "leangate bench all --quick --only passthrough,cache,sot,compress" in text
    pngs = _pngs(tmp_path)
    assert set(pngs) == {
        "latency_by_stage.png",
        "cache_precision_recall.png",
        "passthrough_by_concurrency.png",
    }
    for name, data in pngs.items():
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name
        assert f"]({name})" in text
    # sot failed, and compress measured no tokens: said instead of drawn.
    assert "No plot: `sot` has no result (failed)." in text
    assert "No plot: neither `compress` nor `rag` measured a token reduction." in text


def test_every_plot_is_drawn_when_its_data_is_there(tmp_path: Path) -> None:
    results = small_results()
    results["benchmarks"]["sot"] = {
        "status": "ok",
        "result": {
            "speedup_positive_median": 2.36,
            "speedup_negative_median": 0.979,
            "by_category": [
                {"category": "generic", "questions": 3, "speedup_median": 2.4},
                {"category": "wizardlm", "questions": 5, "speedup_median": 0.98},
            ],
        },
    }
    results["benchmarks"]["rag"] = {
        "status": "ok",
        "result": {"token_reduction_holdout": 4.08, "token_reduction_tune": 4.03},
    }
    report.write_report(results, tmp_path)
    assert len(_pngs(tmp_path)) == len(report.PLOTS)
    labels, values = zip(*report.latency_bars(results)[-2:], strict=True)
    assert labels == ("sot, router-positive", "sot, router-negative")
    assert values == pytest.approx((1 / 2.36, 1 / 0.979))


def test_the_same_results_render_the_same_plot(tmp_path: Path) -> None:
    report.write_report(small_results(), tmp_path / "a")
    report.write_report(small_results(), tmp_path / "b")
    assert _pngs(tmp_path / "a") == _pngs(tmp_path / "b")


def test_a_plot_without_its_data_leaves_no_stale_file(tmp_path: Path) -> None:
    report.write_report(small_results(), tmp_path)
    results = small_results()
    del results["benchmarks"]["cache"]["result"]["qqp_cosine_holdout_curve"]
    malformed = {"concurrency": "x", "latency_ratio": 1.0, "throughput_ratio": 1.0}
    results["benchmarks"]["passthrough"]["result"]["by_concurrency"] = [malformed]
    text = report.write_report(results, tmp_path).read_text()
    assert not (tmp_path / "cache_precision_recall.png").exists()
    assert "`cache` has no `qqp_cosine_holdout_curve`" in text
    assert not (tmp_path / "passthrough_by_concurrency.png").exists()
    assert "No plot: its data could not be drawn (ValueError" in text


def test_goals_and_baselines() -> None:
    assert report.Goal(">=", 0.97).met(0.97) and not report.Goal(">=", 0.97).met(0.96)
    assert report.Goal("==", 0).text() == "= 0"
    assert report.fill("direct {a} ms, leangate {b} ms", {"a": 3010.0, "b": 0.1234}) == (
        "direct 3,010 ms, leangate 0.123 ms"
    )
    assert report.fill("direct {a} ms, leangate {b} ms", {"a": 1.0, "b": None}) == ""
    assert report.number({"x": True}, "x") is None
    assert report.number({"x": float("nan")}, "x") is None


def test_from_results_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(small_results()))
    out = tmp_path / "out"
    main(["bench", "all", "--from-results", str(saved), "--out", str(out)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["report"] == str(out / "report.md")
    assert summary["statuses"]["sot"] == "failed"
    assert json.loads((out / "results.json").read_text()) == small_results()
    assert CPU in (out / "report.md").read_text()
    snippet = (out / "README-headline.md").read_text()
    assert "latency_ratio_c64" in snippet and "latency_by_stage.png)" in snippet


def test_from_results_refuses_a_file_that_is_not_one(tmp_path: Path) -> None:
    saved = tmp_path / "saved.json"
    saved.write_text("[1, 2]")
    with pytest.raises(BenchError, match=r"not a results\.json"):
        main(["bench", "all", "--from-results", str(saved), "--out", str(tmp_path)])


# --- the runner -----------------------------------------------------------------------------


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_the_runner_takes_the_last_json_line(tmp_path: Path) -> None:
    code = (
        "import sys; print('progress', file=sys.stderr); print('{\"a\": 0}'); print('{\"a\": 1}')"
    )
    outcome = all_benchmarks.run_command(
        _python(code), log_path=tmp_path / "logs" / "x.log", timeout_s=30
    )
    assert (outcome.status, outcome.result, outcome.returncode) == ("ok", {"a": 1}, 0)
    assert "progress" in (tmp_path / "logs" / "x.log").read_text()


def test_the_runner_reports_a_failure_with_its_last_log_line(tmp_path: Path) -> None:
    code = "raise SystemExit('BenchError: the data is missing')"
    outcome = all_benchmarks.run_command(_python(code), log_path=tmp_path / "x.log", timeout_s=30)
    assert outcome.status == "failed"
    assert outcome.reason == "exit code 1: BenchError: the data is missing"
    nothing = all_benchmarks.run_command(
        _python("print('no json')"), log_path=tmp_path / "y.log", timeout_s=30
    )
    assert (nothing.status, nothing.result) == ("failed", None)


def test_the_runner_interrupts_a_benchmark_past_its_time(tmp_path: Path) -> None:
    # The stub cleans up on KeyboardInterrupt, as a benchmark's context managers do.
    code = (
        "import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
        "    print('{\"cleaned\": true}')\n"
    )
    started = time.monotonic()
    outcome = all_benchmarks.run_command(
        _python(code), log_path=tmp_path / "x.log", timeout_s=1.5, grace_s=10
    )
    assert time.monotonic() - started < 10
    assert outcome.status == "timeout" and "1 s" not in outcome.reason
    assert outcome.result == {"cleaned": True}


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    all_benchmarks.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_a_small_run_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``bench all`` over stub benchmarks: one prints a result, one fails; the results file,
    logs and report come out as a real run's would."""
    stubs = {
        "cache": _python(f"import json; print(json.dumps({_cache()!r}))"),
        "sot": _python("import sys; print('boom', file=sys.stderr); sys.exit(3)"),
    }
    monkeypatch.setattr(all_benchmarks, "bench_command", lambda bench, *_: stubs[bench.name])
    monkeypatch.setattr(all_benchmarks, "describe_backend", lambda urls: {"urls": list(urls)})
    out = tmp_path / "bench"
    args = _args("--only", "cache,sot", "--backend-url", "http://127.0.0.1:9", "--out", str(out))
    summary = all_benchmarks.run(args)
    saved = json.loads((out / "results.json").read_text())
    assert summary["statuses"] == {
        "passthrough": "skipped",
        "profile": "skipped",
        "cache": "ok",
        "compress": "skipped",
        "rag": "skipped",
        "sot": "failed",
        "decompose": "skipped",
        "load": "skipped",
    }
    assert saved["benchmarks"]["cache"]["result"] == _cache()
    assert saved["benchmarks"]["sot"]["reason"] == "exit code 3: boom"
    assert saved["benchmarks"]["sot"]["log"] == "logs/sot.log"
    assert saved["machine"]["cpu_count"] and saved["machine"]["cpu_model"]
    assert "--only cache,sot --backend-url http://127.0.0.1:9" in saved["command"]
    text = (out / "report.md").read_text()
    assert "`sot`: failed: exit code 3: boom" in text
    assert (out / "cache_precision_recall.png").read_bytes().startswith(PNG_MAGIC)


def test_a_small_real_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two real benchmarks through the CLI, each as its own process, in seconds: without
    their data, compress measures only its protected spans, and sot fails."""
    empty, out = tmp_path / "data", tmp_path / "bench"
    empty.mkdir()
    argv = ["--quick", "--only", "compress,sot", "--data-dir", str(empty), "--out", str(out)]
    # Neither reaches the backend without data: an address nothing listens on proves it.
    main(["bench", "all", *argv, "--backend-url", "http://127.0.0.1:9"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["statuses"]["compress"], summary["statuses"]["sot"]) == ("ok", "failed")
    saved = json.loads((out / "results.json").read_text())
    compress = saved["benchmarks"]["compress"]
    assert compress["result"]["protected_span_violations"] == 0
    assert compress["command"].startswith("leangate bench compress --quick --backend-url")
    assert f"{empty}/sot is missing" in saved["benchmarks"]["sot"]["reason"]
    assert "Traceback" in (out / "logs" / "sot.log").read_text()
    text = (out / "report.md").read_text()
    assert f"`compress`: ran without some data: {empty}/hotpotqa/dev_distractor_20.json" in text
    assert f"`sot`: failed: exit code 1: leangate.bench.common.BenchError: {empty}/sot" in text


def test_each_benchmark_accepts_what_the_runner_passes_on(tmp_path: Path) -> None:
    args = _args(
        "--quick",
        "--backend-url",
        "http://127.0.0.1:8000",
        "--redis-url",
        "redis://127.0.0.1:6379/0",
        "--data-dir",
        str(tmp_path),
        "--rounds",
        "2",
    )
    for bench in all_benchmarks.BENCHES:
        command = all_benchmarks.bench_command(bench, args, ["http://127.0.0.1:8000"])
        assert command[:5] == [sys.executable, "-m", "leangate", "bench", bench.name]
        parser = argparse.ArgumentParser()
        importlib.import_module(BENCHMARKS[bench.name]).add_arguments(parser)
        parsed = parser.parse_args(command[5:])
        assert parsed.quick and parsed.rounds == 2
        assert parsed.redis_url == "redis://127.0.0.1:6379/0"
        # load brings its own responders: a backend given to it would take its load.
        assert parsed.backend_url == (None if bench.name == "load" else ["http://127.0.0.1:8000"])
        if bench.data_dir:
            assert parsed.data_dir == tmp_path.resolve()


def test_selection() -> None:
    plan = all_benchmarks.selected(_args())
    assert [name for name, why in plan.items() if why is None] == [
        "passthrough",
        "profile",
        "cache",
        "compress",
        "rag",
        "sot",
        "decompose",
    ]
    assert "--with-load" in str(plan["load"])
    assert all_benchmarks.selected(_args("--with-load"))["load"] is None
    assert all_benchmarks.selected(_args("--only", "load"))["load"] is None
    with pytest.raises(BenchError, match="unknown"):
        all_benchmarks.selected(_args("--only", "cache,nope"))


# --- the benchmarks' extra keys --------------------------------------------------------------


def _lookup(text: str, correct: str, neighbor: str, similarity: float, kind: str) -> Lookup:
    query = Query(text, frozenset({correct}) if correct else frozenset(), kind, "holdout")  # type: ignore[arg-type]
    return Lookup(query, ((neighbor, similarity),), 1.0)


def test_the_cache_curve_sweeps_a_plain_cosine_threshold() -> None:
    held = Prepared(
        "qqp-holdout",
        3,
        1,
        (
            _lookup("q1", "a", "a", 0.95, "paraphrase"),
            _lookup("q2", "b", "c", 0.85, "paraphrase"),  # the wrong neighbour
            _lookup("q3", "", "a", 0.75, "cross"),
        ),
    )
    curve = cosine_curve(held, (0.7, 0.8, 0.9, 0.99))
    assert [(p["precision"], p["recall"], p["hits"]) for p in curve] == [
        (pytest.approx(1 / 3, abs=1e-4), 0.5, 3),
        (0.5, 0.5, 2),
        (1.0, 0.5, 1),
        (1.0, 0.0, 0),
    ]
    assert curve[0]["cross_false_hit_rate"] == 1.0


def test_sot_speedups_by_category(tmp_path: Path) -> None:
    folder = tmp_path / "fastchat"
    folder.mkdir()
    line = {"question_id": 1, "category": "generic", "turns": ["How do I sleep better?"]}
    (folder / "vicuna_bench_question.jsonl").write_text(json.dumps(line) + "\n")
    labelled = [
        ("How do I sleep better?", 1, "vicuna_router.csv"),
        ("What is 2 + 2?", 0, "wizardlm_router.csv"),
    ]
    categories = question_categories(tmp_path, labelled)
    assert categories == {"How do I sleep better?": "generic", "What is 2 + 2?": "wizardlm"}

    def row(question: str, group: str, direct: float, leangate: float, plan: str) -> Any:
        return {
            "question": question,
            "group": group,
            "direct": {"s": direct},
            "leangate": {"s": leangate, "plan": {"decision": plan}},
        }

    rows = [
        row("How do I sleep better?", "positive", 6.0, 2.0, "sot"),
        row("What is 2 + 2?", "negative", 1.0, 1.0, "direct"),
    ]
    assert by_category(copy.deepcopy(rows), categories) == [
        {
            "category": "generic",
            "questions": 1,
            "positives": 1,
            "speedup_median": 3.0,
            "sot_share": 1.0,
        },
        {
            "category": "wizardlm",
            "questions": 1,
            "positives": 0,
            "speedup_median": 1.0,
            "sot_share": 0.0,
        },
    ]
    assert np.isclose(
        report.sot_categories(
            {
                "benchmarks": {
                    "sot": {
                        "status": "ok",
                        "result": {"by_category": by_category(rows, categories)},
                    }
                }
            }
        )[0][1],
        3.0,
    )
