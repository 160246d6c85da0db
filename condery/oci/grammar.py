"""The grammars of the OCI distribution spec, written once.

Every check of a digest, a tag or a repository name in condery goes through these
patterns, with `fullmatch`: `$` in a pattern also matches before a trailing newline,
so a `match` against `^...$` would let `latest\\n` through.
"""

from __future__ import annotations

import re

# condery stores and serves sha256 digests only (the spec's `algorithm:encoded`, with the
# one algorithm every client supports), lowercase hex as the spec requires for sha256.
DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")
# A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
# One path component of a repository name: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
COMPONENT_RE = re.compile(COMPONENT)
# A repository name: components separated by `/`.
REPOSITORY_RE = re.compile(rf"{COMPONENT}(?:/{COMPONENT})*")


def is_digest(value: object) -> bool:
    """Whether `value` is a well-formed sha256 digest string."""
    return isinstance(value, str) and DIGEST_RE.fullmatch(value) is not None


def is_tag(value: object) -> bool:
    return isinstance(value, str) and TAG_RE.fullmatch(value) is not None
