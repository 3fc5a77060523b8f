"""Process settings, from the environment (``LEANGATE_*``) and the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from leangate.backend.client import BackendSettings

FORWARD_PATHS = (
    "/v1/embeddings",
    "/tokenize",
    "/detokenize",
    "/v1/score",
    "/score",
    "/v1/rerank",
    "/rerank",
    "/pooling",
    "/classify",
)
"""vLLM's JSON endpoints besides completions (``middleware/forwarding.py``)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LEANGATE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    backend_url: str = "http://127.0.0.1:8000"
    """One URL, or several separated by commas (replicas)."""
    backend_api_key: SecretStr | None = None
    backend_timeout_s: float = Field(600.0, gt=0)
    backend_transport: Literal["lean", "aiohttp"] = "lean"
    """How requests reach the backend (``BackendSettings.transport``)."""
    redis_url: str | None = Field(
        None, validation_alias=AliasChoices("LEANGATE_REDIS_URL", "REDIS_URL")
    )
    """Without one, caches live in the proxy's own memory."""
    policy: Path | None = None
    policy_reload_s: float = Field(1.0, gt=0)
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0)
    log_level: str = "warning"
    log_format: Literal["text", "json"] = "text"
    """``json``: one JSON object a line (``leangate/logs.py``)."""
    admin_api_key: SecretStr | None = None
    """Bearer key for the ``/admin`` API and the detailed ``/health``; without one the
    admin API is off."""
    otel: bool = False
    """Export OpenTelemetry spans (request, stage, backend call) over OTLP/HTTP, as the
    ``OTEL_*`` variables say; needs the ``otel`` extra (``pip install 'leangate[otel]'``)."""
    expose_docs: bool = False
    """Serve the OpenAPI schema and ``/docs`` (off: they describe the deployment to anyone)."""
    tokenizer_dirs: dict[str, Path] = Field(default_factory=dict)
    """Local model folders by served model name, for exact token counts without a call
    to the backend (``LEANGATE_TOKENIZER_DIRS='{"SmolLM2-135M-Instruct": "/models/smol"}'``)."""
    load_poll_s: float = Field(2.0, ge=0)
    """How often the backend profile reads the replicas' /metrics for their load."""
    corpus_dir: Path | None = None
    """Where the corpora's indexes (and, without Redis, their chunks) are kept; default
    ``$LEANGATE_HOME/corpora`` (``~/.cache/leangate/corpora``)."""
    forward_paths: list[str] = Field(default_factory=lambda: list(FORWARD_PATHS))
    """Backend endpoints besides completions that are forwarded as they are (POST, JSON,
    not streamed; no stage runs on them), under the same keys and limits
    (``LEANGATE_FORWARD_PATHS='["/v1/embeddings"]'``; ``[]`` forwards none)."""
    drain_timeout_s: int = Field(25, ge=0)
    """On SIGTERM, how long requests in flight (streams included) may take to finish before
    they are cut; whole seconds, as uvicorn counts them. 25 fits Kubernetes' default
    grace period of 30 s with time left to close the services."""

    def backend_urls(self) -> list[str]:
        return [u.strip() for u in self.backend_url.split(",") if u.strip()]

    def backend_settings(self) -> BackendSettings:
        return BackendSettings(
            urls=self.backend_urls(),
            api_key=self.backend_api_key,
            timeout_s=self.backend_timeout_s,
            transport=self.backend_transport,
            load_poll_s=self.load_poll_s,
        )
