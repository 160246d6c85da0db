"""Log lines for people (`text`) and for log shippers (`json`), credentials removed.

An event is a short message plus structured fields, logged with `event(logger, level,
msg, **fields)`. The text format appends the fields as `key=value` (values quoted when
they hold spaces, quotes or newlines, so an untrusted path cannot forge a line); the
JSON format writes one object a line with `ts`, `level`, `logger`, `msg` and the fields.
JSON is made with json.dumps of a dict (the stdlib does the job; no extra dependency).
Both formats run every line through `redact_text` (channel credentials in URLs), the
JSON one over every field value too.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone
from typing import Any

from condery.common.redact import RedactingFilter, redact_text, redact_values

# The record attribute that carries an event's structured fields.
FIELDS = "condery_fields"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A text value with any of these is quoted (JSON string syntax): one event, one line.
_NEEDS_QUOTES = re.compile(r'[\s"=\\]')


def event(logger: logging.Logger, level: int, msg: str, exc: BaseException | None = None, **fields: Any) -> None:
    """Log `msg` with structured `fields` (shown as key=value, or as JSON members), and
    `exc`'s traceback when given."""
    if logger.isEnabledFor(level):
        exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
        # makeRecord + handle is logger.log without the caller lookup (a stack walk per
        # line, for a file and line number no format shows): one runs per request.
        logger.handle(logger.makeRecord(logger.name, level, "(event)", 0, msg, (), exc_info,
                                        extra={FIELDS: fields}))


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    text = "" if value is None else str(value)
    if not text or _NEEDS_QUOTES.search(text):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """The classic line, with an event's fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, FIELDS, None)
        if fields:
            line += " " + " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        return redact_text(line)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts (UTC, ISO 8601), level, logger, msg, the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in (getattr(record, FIELDS, None) or {}).items():
            payload.setdefault(key, value)  # an event field never hides ts/level/logger/msg
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            payload["exc"] = record.exc_text
        return json.dumps(redact_values(payload), default=str)


def configure_logging(verbose: bool, log_format: str = "text") -> None:
    """One stderr handler on the root logger, in `log_format`, with the redacting filter.

    Called again once the configuration is read (the format is a configuration key);
    each call replaces the handler of the previous one.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())  # no channel credential in any log line
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Requests are logged by condery.access (one line each, errors and 499s included):
    # aiohttp's own access log would repeat them.
    for noisy in ("botocore", "aiobotocore", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
