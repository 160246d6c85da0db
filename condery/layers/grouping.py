"""Fit an image's package layers under a layer budget.

Engines refuse images with too many layers, and an environment can hold hundreds of
packages. The largest packages keep a layer of their own, so that the layers which cost
the most to download stay shared between images; everything else is merged into one
layer. Only one merged layer is made because a merged layer is specific to a set of
packages (and so rarely shared), and one is the fewest that fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class LayerGroup:
    members: tuple[str, ...]  # package layer keys merged into one layer (1 = the package alone)


def group_layers(sizes: Mapping[str, int], budget: int) -> list[LayerGroup]:
    """Groups of layer keys, at most `budget` of them, covering every key exactly once.

    Groups come in the order of their first member in `sizes` (the caller's order, e.g.
    dependencies first), and members keep that order. Which packages stay alone is
    decided by size, largest first, ties broken by key, so the result depends only on
    the arguments.
    """
    if budget < 1:
        raise ValueError(f"layer budget must be at least 1, not {budget}")
    keys = list(sizes)
    if len(keys) <= budget:
        return [LayerGroup((k,)) for k in keys]
    by_size = sorted(keys, key=lambda k: (-sizes[k], k))
    alone = set(by_size[: budget - 1])
    merged = tuple(k for k in keys if k not in alone)
    groups: list[LayerGroup] = []
    for k in keys:
        if k in alone:
            groups.append(LayerGroup((k,)))
        elif k == merged[0]:
            groups.append(LayerGroup(merged))
    return groups
