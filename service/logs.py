"""Logging: one JSON object per line (or plain text for a laptop), applied in every worker."""

from __future__ import annotations

import logging
import logging.config
from datetime import UTC, datetime
from typing import Any

import msgspec

# Attributes every LogRecord has; anything else was passed with `extra=` and belongs in the line.
STANDARD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's copy of the message with terminal colour codes
}


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object: time, level, logger, message, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in STANDARD_ATTRIBUTES:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return msgspec.json.encode(line, enc_hook=str).decode()


def logging_config(level: str, log_format: str = "json") -> dict[str, Any]:
    """A dictConfig for this process and uvicorn's workers, uvicorn's own loggers included."""
    formatter: dict[str, Any] = (
        {"()": JsonFormatter}
        if log_format == "json"
        else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "default"}},
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            "uvicorn": {"level": level},
            "uvicorn.error": {"level": level},
            # Our access log carries the route template and request id; uvicorn's would repeat it.
            "uvicorn.access": {"level": "WARNING"},
            # pgserver narrates every pg_ctl call at INFO.
            "pgserver": {"level": "WARNING"},
        },
    }


def configure_logging(level: str, log_format: str = "json") -> None:
    """Apply `logging_config` in this process."""
    logging.config.dictConfig(logging_config(level, log_format))
