"""Did you mean numpy?": close package names for specs the channels do not have.

Asked only after a solve failed, so a good pull never pays for it. The names come from
rattler's gateway, which already holds the repodata (or, for a sharded channel such as
conda-forge, the shard index: names only) the failed solve read, so this is a lookup,
not another download. Any failure here leaves the solver's message as it was: a
suggestion is a courtesy, never a reason for another error.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
from typing import Iterable, Sequence

import rattler

log = logging.getLogger(__name__)

MAX_SUGGESTIONS = 3
MAX_UNKNOWN = 5  # names looked at per failed solve: bounds the work a long name can cause
NAMES_TIMEOUT = 10.0  # seconds for the gateway to list the channels' names
# difflib's own default ratio: `nump` finds numpy (0.89), a swap such as `scpi` still
# finds scipy (0.67), and names that merely share a letter or two stay out.
CUTOFF = 0.6


def close_names(name: str, known: Iterable[str], n: int = MAX_SUGGESTIONS) -> list[str]:
    """The known names closest to `name`, best first (difflib's ratio)."""
    known = list(known)
    # People swap - and _ freely (python_dateutil for python-dateutil): compare with them equal.
    folded = {k.replace("_", "-"): k for k in known}
    matches = difflib.get_close_matches(name.replace("_", "-"), list(folded), n=n, cutoff=CUTOFF)
    return [folded[m] for m in matches]


def spec_names(specs: Sequence[str]) -> list[str]:
    """The package names the specs ask for, in order, without repeats."""
    names: list[str] = []
    for spec in specs:
        try:
            name = rattler.MatchSpec(spec).name
        except Exception:  # checked before the solve; a spec that does not parse has no name
            continue
        if name is not None and name.normalized not in names:
            names.append(name.normalized)
    return names


def unknown_names_hint(wanted: Sequence[str], known: set[str]) -> str:
    """' (no package nump in the channels; did you mean numpy?)', or '' when all are known."""
    parts = []
    for name in [w for w in wanted if w not in known][:MAX_UNKNOWN]:
        matches = close_names(name, known)
        part = f"no package {name} in the channels"
        if matches:
            part += f"; did you mean {' or '.join(matches)}?"
        parts.append(part)
    return f" ({'; '.join(parts)})" if parts else ""


async def suggestions(
    specs: Sequence[str], channels: Sequence[rattler.Channel], platforms: Sequence[str], gateway: rattler.Gateway
) -> str:
    """The hint for the specs' names that no channel has, '' when there is none to give."""
    wanted = spec_names(specs)
    if not wanted:
        return ""
    try:
        names = await asyncio.wait_for(gateway.names(list(channels), list(platforms)), NAMES_TIMEOUT)
        known = {name.normalized for name in names}
        # difflib over a big channel's ~30,000 names takes tens of milliseconds: not on the loop.
        return await asyncio.to_thread(unknown_names_hint, wanted, known)
    except Exception as exc:  # a courtesy only: the solver's message stands without it
        log.debug("no name suggestions: %s", type(exc).__name__)
        return ""
