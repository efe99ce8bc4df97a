"""Structured logs: one JSON object a line, with the refund fields a decision log carries.

Only ids, decisions and reason codes are logged: never image bytes, URLs'
contents, descriptions or fingerprints.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

_FIELDS = ("refund_id", "decision", "reasons", "policy_version", "dlq_cause")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def logging_config(fmt: str, level: str) -> dict[str, object]:
    """A dictConfig for the worker: one handler on stdout, JSON or text."""
    formatter: dict[str, object] = (
        {"()": "streams.logs.JsonFormatter"} if fmt == "json"
        else {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "main",
                                 "stream": "ext://sys.stdout"}},
        "root": {"level": level, "handlers": ["default"]},
    }
