"""Logging: one JSON object per line (or plain text for a laptop), written off the event loop.

One thread per process owns stderr. Log records and access lines are handed to it through a
queue, so a slow reader of the stream (a container runtime's pipe, a terminal) never blocks the
event loop. Access lines skip the `LogRecord` machinery: they are built directly, once.
"""

from __future__ import annotations

import atexit
import logging
import logging.config
import os
import queue
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any, TextIO

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
            "time": _timestamp(record.created),
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


# How long the writer lets lines gather before one write: the delay a line may have.
BATCH_SECONDS = 0.02


class StderrWriter:
    """The thread that owns stderr in this process; others hand it whole lines."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="stderr-writer", daemon=True)
        self.thread.start()
        atexit.register(self.close)

    def write(self, line: str) -> None:
        """Queue one line (with its newline); never blocks."""
        self.lines.put(line)

    def close(self) -> None:
        """Write what is queued, then stop (at exit: no line is lost)."""
        if self.thread.is_alive():
            self.lines.put(None)
            self.thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            batch = [self.lines.get()]
            # Let lines gather before writing them out together: waking this thread for every
            # line would make it take the interpreter lock from the event loop per request.
            time.sleep(BATCH_SECONDS)
            while True:
                try:
                    batch.append(self.lines.get_nowait())
                except queue.Empty:
                    break
            done = None in batch
            try:
                self.stream.write("".join(line for line in batch if line is not None))
                self.stream.flush()
            except (OSError, ValueError):  # the stream is gone (closed pipe): nothing to do
                pass
            if done:
                return


_current_writer: StderrWriter | None = None
_writer_lock = threading.Lock()


def stderr_writer() -> StderrWriter:
    """This process's writer, started on first use (uvicorn's workers are new processes)."""
    global _current_writer
    with _writer_lock:
        if _current_writer is None:
            _current_writer = StderrWriter(sys.stderr)
        return _current_writer


def _writer() -> StderrWriter:
    return _current_writer or stderr_writer()


def _forget_writer_after_fork() -> None:
    # A forked child has the parent's queue but not its thread: it starts a writer of its own.
    global _current_writer
    _current_writer = None


os.register_at_fork(after_in_child=_forget_writer_after_fork)


class QueuedStderrHandler(logging.Handler):
    """A logging handler that formats in the caller and leaves the write to the writer thread."""

    def __init__(self, writer: StderrWriter | None = None) -> None:
        super().__init__()
        self.writer = writer  # None: this process's stderr writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            (self.writer or _writer()).write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


class AccessLog:
    """One line per request: `all`, only `errors` (status >= 400), or `off`.

    The JSON line is built with one f-string: every field is either a number or a string that
    cannot hold a quote or a backslash (an HTTP method token, a route template of ours, a
    request id that `service.middleware` has checked against its pattern).
    """

    def __init__(self, mode: str, log_format: str, level: str) -> None:
        self.enabled = mode != "off" and logging.getLevelName(level) <= logging.INFO
        self.errors_only = mode == "errors"
        self.json = log_format == "json"
        self._second = -1
        self._second_text = ""

    def record(
        self,
        method: str,
        route: str,
        status: int,
        seconds: float,
        request_id: str,
        trace_id: str = "",
        sampled: bool = False,
    ) -> None:
        """Queue the request's line, if this mode keeps it; with tracing on, the line names the
        request's trace (32 hex digits) and whether it was sampled (exported)."""
        if not self.enabled or (self.errors_only and status < 400):
            return
        now = time.time()
        second = int(now)
        if second != self._second:  # the date and time change once a second; format them then
            self._second = second
            self._second_text = time.strftime(
                "%Y-%m-%dT%H:%M:%S" if self.json else "%Y-%m-%d %H:%M:%S",
                time.gmtime(second) if self.json else time.localtime(second),
            )
        millis = int((now - second) * 1000)
        duration_ms = round(seconds * 1000, 2)
        if self.json:
            trace = (
                f',"trace_id":"{trace_id}","trace_sampled":{"true" if sampled else "false"}'
                if trace_id
                else ""
            )
            line = (
                f'{{"time":"{self._second_text}.{millis:03d}+00:00","level":"INFO",'
                f'"logger":"service.access","message":"{method} {route} {status}",'
                f'"http":{{"method":"{method}","route":"{route}","status":{status},'
                f'"duration_ms":{duration_ms}}},"request_id":"{request_id}"{trace}}}\n'
            )
        else:
            trace = f" trace {trace_id}{'' if sampled else ' (not sampled)'}" if trace_id else ""
            line = (
                f"{self._second_text},{millis:03d} INFO service.access: "
                f"{method} {route} {status} {duration_ms} ms {request_id}{trace}\n"
            )
        _writer().write(line)


def logging_config(level: str, log_format: str = "json") -> dict[str, Any]:
    """A dictConfig for this process and uvicorn's workers, uvicorn's own loggers included."""
    formatter: dict[str, Any] = (
        {"()": JsonFormatter}
        if log_format == "json"
        else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    )
    # Libraries that narrate routine work at INFO get warnings only, or less if `level` says so.
    quiet = level if logging.getLevelName(level) > logging.WARNING else "WARNING"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"stderr": {"()": QueuedStderrHandler, "formatter": "default"}},
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            "uvicorn": {"level": level},
            "uvicorn.error": {"level": level},
            # Our access log carries the route template and request id; uvicorn's would repeat it.
            "uvicorn.access": {"level": quiet},
            # pgserver narrates every pg_ctl call at INFO.
            "pgserver": {"level": quiet},
            # The pool's "Pool disposed", "Pool recreating" and "Invalidate connection" at every
            # replaced connection, and the engine's every statement. SQLAlchemy sets WARNING on
            # import only if nothing configured it before; this does not depend on the order.
            "sqlalchemy.pool": {"level": quiet},
            "sqlalchemy.engine": {"level": quiet},
        },
    }


def configure_logging(level: str, log_format: str = "json") -> None:
    """Apply `logging_config` in this process."""
    logging.config.dictConfig(logging_config(level, log_format))


def _timestamp(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
