"""Log records that carry the request id of the request or session they happened in.

Transports set `request_id` (a ContextVar) when a request or WebSocket session starts; it follows the work
into every coroutine and task spawned from there, so a log line can be traced to the `request_id` the client
saw in its response or events. `json` format writes one object per line for log collectors.

Credentials can arrive in the query string (`?api_key=`, `?access_token=`), which the access log would
otherwise print: every record's arguments pass through `redact` first.
"""

from __future__ import annotations

import json
import logging
import re
import time
from contextvars import ContextVar

request_id: ContextVar[str | None] = ContextVar("stenograph_request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
_CREDENTIAL_PARAM = re.compile(r"((?:^|[?&])(?:api_key|access_token)=)[^&\s\"]*", re.IGNORECASE)


def redact(text: str) -> str:
    return _CREDENTIAL_PARAM.sub(r"\1[redacted]", text)


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record and scrubs credentials from query strings in its arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get() or "-"
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", "-")
        if rid != "-":
            entry["request_id"] = rid
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(fmt: str, level: str = "info") -> None:
    """Route every logger, uvicorn's included, through one root handler in the chosen format."""
    if fmt not in {"text", "json"}:
        raise ValueError(f"STENOGRAPH_LOG_FORMAT must be text or json, got {fmt!r}")
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
