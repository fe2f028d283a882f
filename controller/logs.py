"""The processes' log lines: one JSON object per line on stderr (the controller's and its agent
gateways'; `controller.gateway` imports this and nothing heavier)."""

from __future__ import annotations

import json
import logging
import sys
import time


class StructuredFormatter(logging.Formatter):
    """One JSON object per line on stderr: time, level, logger, message (and exc on errors)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(StructuredFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def one_line(exc: BaseException) -> str:
    """An exception's first line, its class named: what a log line needs of an expected failure
    (a database outage) instead of a traceback each time."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
