"""Credentials out of everything condery writes: images, labels, logs, error bodies.

Channel URLs can carry secrets in two places: userinfo (`https://user:password@host/...`)
and an anaconda.org-style token path segment (`https://host/t/<token>/channel/...`).
Images are served without authentication, so an image's `explicit.txt` or a
`conda-meta/*.json` `url` holding either would hand the channel's credentials to anyone
who pulls. Both are removed the way conda removes them when it exports an environment:
the URL stays usable with the reader's own credentials (conda and rattler add them back
from their auth files). The preferred way to give condery credentials is rattler's auth
file (`RATTLER_AUTH_FILE`), which never puts them in a URL in the first place.

A URL's query can hold a secret too (`redis://host/0?password=...`, `?access_token=...`,
which redis-py and some mirrors read): such values are replaced by `***`.

`redact_text` does the same for URLs inside free text (solver and downloader errors
quote URLs), and `RedactingFilter` applies it to every log record.
"""

from __future__ import annotations

import logging
import re
from typing import Any

# scheme://[userinfo@]host[:port][/t/<token>]
_URL_AUTH = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)"
    r"(?P<userinfo>[^\s/@'\"<>]*@)?"
    r"(?P<host>[^\s/'\"<>]*)"
    r"(?P<token>/t/[^\s/'\"<>]+)?"
)


# ?password=... / &token=...: the value, up to the next parameter or the URL's end.
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&](?:password|passwd|pass|token|access_token|auth|secret|api_key|apikey)=)[^&\s'\"<>]*",
    re.IGNORECASE,
)


def _strip(match: re.Match[str]) -> str:
    return match.group("scheme") + match.group("host")


def redact_url(url: str) -> str:
    """`url` without userinfo, a `/t/<token>` segment after the host or a secret query value."""
    if "://" not in url:
        return url
    return _QUERY_SECRET.sub(r"\g<key>***", _URL_AUTH.sub(_strip, url, count=1))


def redact_text(text: str) -> str:
    """`text` with every URL in it redacted."""
    if "://" not in text:
        return text
    return _QUERY_SECRET.sub(r"\g<key>***", _URL_AUTH.sub(_strip, text))


def redact_values(value: Any) -> Any:
    """A JSON-like value with every string in it redacted (for records written to images)."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_values(v) for v in value]
    return value


class RedactingFilter(logging.Filter):
    """Redacts the formatted message (and exception text) of every record it sees.

    Installed on the handlers, so that third-party loggers (aiohttp, rattler's errors
    quoted in our messages) are covered too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text = str(exc)
            if redact_text(text) != text:
                # Keep the type, drop the secret: the formatted traceback shows str(exc).
                record.exc_text = f"{type(exc).__name__}: {redact_text(text)} (traceback withheld: it held a credential)"
                record.exc_info = None
        return True
