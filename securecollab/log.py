"""JSON logs: one line per event on stderr, with the current request id.

Use the standard `logging` module everywhere; pass structured fields as
``log.info("user registered", extra={"fields": {"user": uid}})``. Fields whose names
look like secrets (password, token, secret, authorization, cookie) are replaced by
"[redacted]" before they are written, as a second line of defence: callers must still
never pass secret values.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any, TextIO

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "securecollab_request_id", default=None
)

_SECRET_WORDS = ("password", "passcode", "token", "secret", "authorization", "cookie")
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _redact(fields: dict[str, Any]) -> dict[str, Any]:
    return {
        k: "[redacted]" if any(w in k.lower() for w in _SECRET_WORDS) else v
        for k, v in fields.items()
    }


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object: ts, level, logger, msg, request_id, fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id_var.get()
        if rid:
            out["request_id"] = rid
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for k, v in _redact(fields).items():
                out.setdefault(k, v)
        if record.exc_info:
            # tracebacks go to the operator's log only, never to a client
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Route every logger (ours, hypercorn's) to one JSON handler at `level`."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # hypercorn's access log duplicates ours; its error log is useful
    logging.getLogger("hypercorn.access").disabled = True
