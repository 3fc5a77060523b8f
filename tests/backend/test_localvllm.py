"""Unit tests for the pure parts of leangate.backend.localvllm (no vLLM needed)."""

from __future__ import annotations

import dataclasses
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from leangate.backend import localvllm as lv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_config_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEANGATE_HOME", raising=False)
    cfg = lv.LocalVLLMConfig()
    assert cfg.home == Path("~/.cache/leangate").expanduser()
    assert (cfg.host, cfg.port) == ("127.0.0.1", 8000)
    assert cfg.max_model_len == 8192
    assert cfg.kv_cache_gib == 2
    assert cfg.startup_timeout_s == 600
    assert lv.MODEL_NAME == "SmolLM2-135M-Instruct"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.__setattr__("port", 1)


def test_home_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LEANGATE_HOME", str(tmp_path))
    cfg = lv.LocalVLLMConfig()
    assert cfg.home == tmp_path
    assert cfg.model_dir == tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert cfg.log_path == tmp_path / "logs" / "vllm-8000.log"
    assert cfg.venv_python == tmp_path / "vllm-venv" / "bin" / "python"


def test_url_has_no_v1() -> None:
    assert lv.LocalVLLMConfig().url == "http://127.0.0.1:8000"
    assert lv.LocalVLLMConfig(host="0.0.0.0", port=9001).url == "http://0.0.0.0:9001"


def test_server_command_flags(tmp_path: Path) -> None:
    srv = lv.LocalVLLM(lv.LocalVLLMConfig(home=tmp_path, port=8123, max_model_len=1024))
    cmd = srv.command(tmp_path / "m")
    joined = " ".join(cmd)
    assert "-m vllm.entrypoints.openai.api_server" in joined
    assert "--served-model-name SmolLM2-135M-Instruct" in joined
    assert "--dtype float32" in joined
    assert "--max-model-len 1024" in joined
    assert "--port 8123" in joined
    assert "--enable-prefix-caching" in cmd
    env = srv.environment()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_NO_USAGE_STATS"] == "1"
    assert not srv.owned
    srv.stop()  # no-op when nothing was started


def test_default_command_serves_8k_context(tmp_path: Path) -> None:
    cmd = lv.LocalVLLM(lv.LocalVLLMConfig(home=tmp_path)).command(tmp_path / "m")
    assert cmd[cmd.index("--max-model-len") + 1] == "8192"


def test_environment_keeps_compiled_model_under_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")
    env = lv.LocalVLLM(lv.LocalVLLMConfig(home=tmp_path)).environment()
    assert env["VLLM_USE_AOT_COMPILE"] == "0"
    assert env["VLLM_CACHE_ROOT"] == str(tmp_path / "vllm-cache")
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "vllm-cache" / "inductor")


def test_environment_keeps_callers_cache_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "ci-cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    env = lv.LocalVLLM(lv.LocalVLLMConfig(home=tmp_path / "home")).environment()
    assert env["VLLM_CACHE_ROOT"] == str(tmp_path / "ci-cache")
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "ci-cache" / "inductor")


def test_is_serving_false_on_closed_port() -> None:
    assert lv.is_serving(f"http://127.0.0.1:{_free_port()}") is False


class _Handler(http.server.BaseHTTPRequestHandler):
    models: list[str] = []

    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": m} for m in self.models]})
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def fake_server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("H", (_Handler,), {"models": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join()


def test_is_serving_checks_model_name(fake_server: tuple[str, type[_Handler]]) -> None:
    url, handler = fake_server
    handler.models = ["other-model"]
    assert lv.is_serving(url) is False
    handler.models = ["other-model", lv.MODEL_NAME]
    assert lv.is_serving(url) is True
    assert lv.is_serving(url + "/") is True


def test_start_reuses_existing_server(
    fake_server: tuple[str, type[_Handler]], tmp_path: Path
) -> None:
    url, handler = fake_server
    handler.models = [lv.MODEL_NAME]
    port = int(url.rsplit(":", 1)[1])
    srv = lv.LocalVLLM(lv.LocalVLLMConfig(home=tmp_path, port=port))
    with srv:
        assert srv.url == url
        assert not srv.owned
    assert not (tmp_path / "vllm-venv").exists()


def test_start_refuses_foreign_port(
    fake_server: tuple[str, type[_Handler]], tmp_path: Path
) -> None:
    url, handler = fake_server
    handler.models = ["something-else"]
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(RuntimeError, match="in use"):
        lv.LocalVLLM(lv.LocalVLLMConfig(home=tmp_path, port=port)).start()


def test_cli_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert lv.main(["url", "--port", "8765"]) == 0
    assert capsys.readouterr().out.strip() == "http://127.0.0.1:8765"
