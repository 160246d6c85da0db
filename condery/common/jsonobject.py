"""Untrusted JSON that must be an object: store records, manifests, auth files.

One reader for all of them, so each caller only says what the bytes were meant to be.
"""

from __future__ import annotations

import json
from typing import Any


def json_object(data: bytes | str) -> dict[str, Any] | None:
    """`data` parsed if it is a JSON object; None for anything else, invalid JSON included."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError; hostile nesting depth
        return None
    return value if isinstance(value, dict) else None
