"""Logging set-up, as one dictConfig that uvicorn applies in every worker process."""

from __future__ import annotations

import logging.config
from typing import Any


def logging_config(level: str) -> dict[str, Any]:
    """Plain text lines on stderr at `level`, uvicorn's loggers included."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        },
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "plain"},
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            "uvicorn": {"level": level},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"level": "WARNING"},
            # pgserver narrates every pg_ctl call at INFO.
            "pgserver": {"level": "WARNING"},
        },
    }


def configure_logging(level: str) -> None:
    """Apply `logging_config` in this process."""
    logging.config.dictConfig(logging_config(level))
