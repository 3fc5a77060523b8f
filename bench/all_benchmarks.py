"""``leangate bench all``: every benchmark in one run, and a report of it.

Each benchmark runs as its own process (``python -m leangate bench NAME``), one after
another against the same backend, so that one benchmark's crash, hang or leaked thread
cannot take the others with it, and each gets the machine to itself. Its progress goes to
``<out>/logs/NAME.log``; its figures are the JSON object on the last line of its output.
After each benchmark the results so far are saved in ``<out>/results.json`` (an hour's run
interrupted late keeps what it measured); at the end ``bench/report.py`` renders
``<out>/report.md`` and its plots from that file. ``--from-results`` renders a saved file
again without measuring anything.

A benchmark that fails, times out or lacks its data is recorded as such, with the last
line of its log as the reason, and the report lists it; the run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import report
from .common import (
    BenchError,
    add_common_arguments,
    backend_urls,
    given_backend_urls,
    log,
    machine_info,
)

DEFAULT_OUT = Path("docs/bench")
RESULTS_FILE = "results.json"
README_SNIPPET_FILE = "README-headline.md"
INTERRUPT_GRACE_S = 30.0
"""How long a benchmark has, after SIGINT, to stop the proxies and servers it started."""


@dataclass(frozen=True)
class Bench:
    """A benchmark as this runner drives it."""

    name: str
    data_dir: bool
    """It reads ``--data-dir`` (others accept the option but ignore it)."""
    backend: bool
    """It measures the backend given with ``--backend-url``. ``load`` does not: given one,
    it would send its load there instead of to responders of its own."""
    timeout_s: tuple[float, float]
    """Quick and full: about three times the longest run seen on the 2-core machine."""
    optional: bool = False


BENCHES: tuple[Bench, ...] = (
    Bench("passthrough", data_dir=False, backend=True, timeout_s=(600, 1800)),
    Bench("profile", data_dir=False, backend=True, timeout_s=(600, 900)),
    Bench("cache", data_dir=True, backend=True, timeout_s=(600, 1200)),
    Bench("compress", data_dir=True, backend=True, timeout_s=(600, 1800)),
    Bench("rag", data_dir=True, backend=True, timeout_s=(900, 2400)),
    Bench("sot", data_dir=True, backend=True, timeout_s=(900, 1800)),
    Bench("decompose", data_dir=True, backend=True, timeout_s=(900, 2400)),
    Bench("load", data_dir=False, backend=False, timeout_s=(900, 2400), optional=True),
)
BY_NAME = {bench.name: bench for bench in BENCHES}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``leangate bench all``; the common ones go to every benchmark."""
    add_common_arguments(parser)
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="passed on (default: each one's own)"
    )
    parser.add_argument(
        "--only",
        default=None,
        metavar="NAME,...",
        help=f"comma-separated subset of: {', '.join(BY_NAME)}",
    )
    parser.add_argument(
        "--with-load",
        action="store_true",
        help="also run `load` (it measures the proxy against fake responders, not vLLM)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report folder")
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=None,
        help="time limit of each benchmark (default: each one's own, see BENCHES)",
    )
    parser.add_argument(
        "--from-results",
        type=Path,
        default=None,
        metavar="FILE",
        help="render the report from a saved results.json, running nothing",
    )


def run(args: argparse.Namespace) -> dict[str, object]:
    """Run the selected benchmarks (or read ``--from-results``), then write the report."""
    out: Path = args.out
    if args.from_results is not None:
        results = load_results(args.from_results)
        if args.from_results.resolve() != (out / RESULTS_FILE).resolve():
            save_results(results, out)
    else:
        results = run_benchmarks(args, selected(args))
    path = report.write_report(results, out)
    snippet = out / README_SNIPPET_FILE
    snippet.write_text(report.readme_snippet(results, _plot_address(out)))
    log(f"report: {path}")
    return {
        "benchmark": "all",
        "report": str(path),
        "results": str(out / RESULTS_FILE),
        "statuses": {name: entry["status"] for name, entry in results["benchmarks"].items()},
        "machine": machine_info(),
    }


def _plot_address(out: Path) -> str:
    """The latency plot as the README, at the repository root, addresses it."""
    plot = out / report.PLOTS[0].file
    with contextlib.suppress(ValueError):
        return plot.resolve().relative_to(Path.cwd()).as_posix()
    return plot.as_posix()


# --- selection and commands -------------------------------------------------------------------


def selected(args: argparse.Namespace) -> dict[str, str | None]:
    """Every benchmark, in order: None if it runs, else why it does not."""
    if args.only:
        names = [n.strip() for n in str(args.only).split(",") if n.strip()]
        unknown = sorted(set(names) - set(BY_NAME))
        if unknown or not names:
            raise BenchError(f"--only: unknown {unknown}; choose from {', '.join(BY_NAME)}")
        return {b.name: None if b.name in names else "not in --only" for b in BENCHES}
    return {
        b.name: "optional: pass --with-load (it measures fake responders, not vLLM)"
        if b.optional and not args.with_load
        else None
        for b in BENCHES
    }


def bench_command(bench: Bench, args: argparse.Namespace, urls: Sequence[str]) -> list[str]:
    """``python -m leangate bench NAME`` with the options this run passes on to it."""
    command = [sys.executable, "-m", "leangate", "bench", bench.name]
    if args.quick:
        command.append("--quick")
    if bench.backend:
        for url in urls:
            command += ["--backend-url", url]
    if args.redis_url:
        command += ["--redis-url", args.redis_url]
    if bench.data_dir and args.data_dir is not None:
        command += ["--data-dir", str(Path(args.data_dir).resolve())]
    if args.rounds is not None:
        command += ["--rounds", str(args.rounds)]
    if args.proxy_command:
        command += ["--proxy-command", args.proxy_command]
    return [*command, "--seed", str(args.seed)]


def timeout_of(bench: Bench, args: argparse.Namespace) -> float:
    if args.timeout_s is not None:
        return float(args.timeout_s)
    return bench.timeout_s[0] if args.quick else bench.timeout_s[1]


def reproduce_command(args: argparse.Namespace) -> str:
    """The command line that runs this again, as the report shows it."""
    parts = ["leangate", "bench", "all"]
    if args.quick:
        parts.append("--quick")
    if args.only:
        parts += ["--only", str(args.only)]
    if args.with_load:
        parts.append("--with-load")
    for url in given_backend_urls(args):
        parts += ["--backend-url", url]
    if args.redis_url:
        parts += ["--redis-url", args.redis_url]
    if args.data_dir is not None:
        parts += ["--data-dir", str(args.data_dir)]
    if args.seed:
        parts += ["--seed", str(args.seed)]
    if Path(args.out) != DEFAULT_OUT:
        parts += ["--out", str(args.out)]
    return shlex.join(parts)


# --- running one benchmark --------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How one benchmark process ended."""

    status: str
    """``ok``, ``failed`` or ``timeout``."""
    reason: str
    result: dict[str, Any] | None
    returncode: int | None
    started_at: str
    finished_at: str
    duration_s: float


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_command(
    command: Sequence[str],
    *,
    log_path: Path,
    timeout_s: float,
    grace_s: float = INTERRUPT_GRACE_S,
) -> Outcome:
    """Run ``command`` with its stderr in ``log_path``; its result is the JSON object on
    the last non-empty line of its stdout.

    The process gets a session of its own, so that on a timeout (or Ctrl-C here) SIGINT
    reaches it and every child it did not put in a group of its own: Python turns SIGINT
    into KeyboardInterrupt, so the benchmark's context managers stop the servers it
    started; SIGKILL follows after ``grace_s``.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started_at, started = now(), time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as stderr:
        process = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            start_new_session=True,
            preexec_fn=_default_sigint,
        )
        timed_out = False
        try:
            stdout, _ = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            stdout = _interrupt(process, grace_s)
        except BaseException:
            _interrupt(process, grace_s)
            raise
    status, reason, result = _judge(process.returncode, stdout, log_path, timed_out, timeout_s)
    return Outcome(
        status=status,
        reason=reason,
        result=result,
        returncode=process.returncode,
        started_at=started_at,
        finished_at=now(),
        duration_s=round(time.monotonic() - started, 1),
    )


def _default_sigint() -> None:
    """In the child, before it runs: SIGINT back to its default. A shell starts background
    jobs (``cmd &``) with SIGINT ignored, the child inherits that, and Python then never
    turns SIGINT into KeyboardInterrupt: the benchmark could not be stopped cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(process: subprocess.Popen[bytes], grace_s: float) -> bytes:
    """SIGINT to the process's group, then SIGKILL if it is still there after ``grace_s``;
    what it wrote to stdout."""
    _signal_group(process, signal.SIGINT)
    try:
        stdout, _ = process.communicate(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        stdout, _ = process.communicate()
    return stdout or b""


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def _judge(
    returncode: int | None, stdout: bytes, log_path: Path, timed_out: bool, timeout_s: float
) -> tuple[str, str, dict[str, Any] | None]:
    """Status, reason and result of a finished process."""
    result = last_json(stdout)
    if timed_out:
        return "timeout", f"no result after {timeout_s:.0f} s; stopped", result
    if returncode != 0:
        return "failed", f"exit code {returncode}: {log_tail(log_path)}", result
    if result is None:
        return "failed", "no JSON object on the last line of its output", None
    return report.OK, "", result


def last_json(stdout: bytes) -> dict[str, Any] | None:
    """The JSON object on the last non-empty line, else None."""
    lines = [line for line in stdout.decode(errors="replace").splitlines() if line.strip()]
    if not lines:
        return None
    try:
        found = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None
    return found if isinstance(found, dict) else None


def log_tail(path: Path, limit: int = 300) -> str:
    """The last non-empty line of a log (a traceback's last line names the error)."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except FileNotFoundError:
        return "no log"
    return lines[-1].strip()[:limit] if lines else "nothing logged"


# --- the whole run ----------------------------------------------------------------------------


def run_benchmarks(args: argparse.Namespace, plan: Mapping[str, str | None]) -> dict[str, Any]:
    """Run every planned benchmark in turn, saving the results after each one."""
    out: Path = args.out
    results: dict[str, Any] = {
        "schema": 1,
        "command": reproduce_command(args),
        "quick": bool(args.quick),
        "started_at": now(),
        "machine": describe_machine(),
        "backend": {},
        "benchmarks": {
            name: {"status": "skipped", "reason": why} for name, why in plan.items() if why
        },
    }
    started = time.monotonic()
    chosen = [BY_NAME[name] for name, why in plan.items() if why is None]
    with _backend(args, chosen) as urls:
        results["backend"] = describe_backend(urls)
        for bench in chosen:
            results["benchmarks"][bench.name] = _run_one(bench, args, urls, out)
            results["benchmarks"] = _in_order(results["benchmarks"])
            results["duration_s"] = round(time.monotonic() - started, 1)
            results["finished_at"] = now()
            save_results(results, out)
    results["benchmarks"] = _in_order(results["benchmarks"])
    results["finished_at"] = now()
    results["duration_s"] = round(time.monotonic() - started, 1)
    save_results(results, out)
    return results


@contextlib.contextmanager
def _backend(args: argparse.Namespace, chosen: Sequence[Bench]) -> Iterator[list[str]]:
    """The backend every benchmark measures: the one given, else the bundled vLLM started
    once for all of them (not once each)."""
    if not any(bench.backend for bench in chosen):
        yield []
        return
    with backend_urls(args) as urls:
        yield urls


def _run_one(
    bench: Bench, args: argparse.Namespace, urls: Sequence[str], out: Path
) -> dict[str, Any]:
    command = bench_command(bench, args, urls)
    log_path = out / "logs" / f"{bench.name}.log"
    log(f"{bench.name}: {shlex.join(command)}")
    outcome = run_command(command, log_path=log_path, timeout_s=timeout_of(bench, args))
    log(f"{bench.name}: {outcome.status} in {outcome.duration_s} s {outcome.reason}".rstrip())
    return {
        "status": outcome.status,
        "reason": outcome.reason,
        "result": outcome.result,
        "returncode": outcome.returncode,
        "started_at": outcome.started_at,
        "finished_at": outcome.finished_at,
        "duration_s": outcome.duration_s,
        "log": log_path.relative_to(out).as_posix(),
        "command": shlex.join(["leangate", *command[3:]]),
    }


def _in_order(benchmarks: Mapping[str, Any]) -> dict[str, Any]:
    return {name: benchmarks[name] for name in BY_NAME if name in benchmarks}


def save_results(results: Mapping[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    partial.replace(path)  # a reader never sees half a file
    return path


def load_results(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchError(f"--from-results {path}: {exc}") from exc
    if not isinstance(found, dict) or not isinstance(found.get("benchmarks"), dict):
        raise BenchError(f"--from-results {path}: not a results.json of `leangate bench all`")
    return found


# --- where it ran -------------------------------------------------------------------------------


def describe_machine() -> dict[str, object]:
    """:func:`machine_info` and what names the machine: processor and memory."""
    machine = machine_info()
    machine["cpu_model"] = _cpu_model()
    machine["memory_gib"] = _memory_gib()
    machine["machine"] = platform.machine()
    return machine


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def describe_backend(urls: Sequence[str]) -> dict[str, object]:
    """The backend's models and vLLM version, as it reports them (best effort: a figure
    without them is still a figure)."""
    import httpx

    models: list[str] = []
    version: str | None = None
    for url in urls:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
            data = httpx.get(f"{url}/v1/models", timeout=5).json()["data"]
            models += [str(m["id"]) for m in data if str(m["id"]) not in models]
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
            version = version or str(httpx.get(f"{url}/version", timeout=5).json()["version"])
    return {"urls": list(urls), "models": models, "version": version}
