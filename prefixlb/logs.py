"""Logging setup for prefixlb's processes: human-readable text, or one JSON object per line.

JSON lines carry ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``msg``, the worker index when
running with ``--workers``, and any structured fields a log call passes in ``extra`` (the access
log's ``request_id``, ``tier``, ``replica``, ``status``, ``duration_ms``, ...). Exceptions are a
``exc`` string field, never a multi-line dump. Secrets never reach a log line: the admin token
and ``authorization`` headers are not logged anywhere.
"""

from __future__ import annotations

import datetime
import logging
import sys

import orjson

__all__ = ["JSONFormatter", "setup_logging"]

# attributes every LogRecord has; anything else on a record came from ``extra=``
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


class JSONFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.worker is not None:
            out["worker"] = self.worker
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup_logging(level: str = "info", fmt: str = "text", access_log: bool = False, worker: int | None = None) -> None:
    """Configure the root logger (call once per process; workers call it again after spawn)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter(worker))
    else:
        tag = "" if worker is None else f"[w{worker}]"
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("prefixlb.access").setLevel(logging.INFO if access_log else logging.WARNING)
    logging.getLogger("prefixlb.access").disabled = not access_log
