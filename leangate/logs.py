"""The proxy's log lines: plain text for a terminal, or one JSON object a line for a log
pipeline (``LEANGATE_LOG_FORMAT=json``).

Nothing leangate logs holds a prompt or an answer: stages log what happened (a stage
failed open, a store went away), never what was asked.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Literal

import orjson

LogFormat = Literal["text", "json"]


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message"}``, plus ``exception`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, str] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def configure(level: str, fmt: LogFormat) -> None:
    """Send the root logger's lines to stderr at ``level``, as ``fmt``."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
