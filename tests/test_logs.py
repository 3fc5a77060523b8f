"""Log lines as JSON for log pipelines."""

from __future__ import annotations

import json
import logging
import sys

from leangate.logs import JsonFormatter, configure


def test_json_lines_carry_level_logger_message_and_exception() -> None:
    try:
        raise ValueError("bad thing")
    except ValueError:
        record = logging.getLogger("leangate.x").makeRecord(
            "leangate.x", logging.WARNING, __file__, 1, "stage %s failed", ("rag",), sys.exc_info()
        )
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "warning" and line["logger"] == "leangate.x"
    assert line["message"] == "stage rag failed"
    assert "ValueError: bad thing" in line["exception"]
    assert line["time"].endswith("+00:00")


def test_configure_replaces_the_root_handlers() -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure("info", "json")
        assert root.level == logging.INFO
        assert [type(h.formatter) for h in root.handlers] == [JsonFormatter]
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
