"""group_layers: a pure function, checked on examples and on properties."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from condery.layers.grouping import LayerGroup, group_layers

sizes_strategy = st.dictionaries(st.text("abcdefgh", min_size=1, max_size=4), st.integers(0, 10**9), max_size=40)


def test_under_budget_keeps_every_package_alone() -> None:
    assert group_layers({"b": 1, "a": 5}, 3) == [LayerGroup(("b",)), LayerGroup(("a",))]
    assert group_layers({}, 1) == []


def test_over_budget_merges_the_smallest() -> None:
    sizes = {"python": 30, "zlib": 1, "openssl": 10, "tzdata": 2, "ncurses": 3}
    assert group_layers(sizes, 3) == [
        LayerGroup(("python",)),
        LayerGroup(("zlib", "tzdata", "ncurses")),
        LayerGroup(("openssl",)),
    ]
    assert group_layers(sizes, 1) == [LayerGroup(tuple(sizes))]


def test_ties_are_broken_by_key() -> None:
    # Three of size 5, room for one alone: "a" wins the tie whatever the input order.
    for order in (["c", "a", "b"], ["b", "c", "a"]):
        groups = group_layers({k: 5 for k in order}, 2)
        assert LayerGroup(("a",)) in groups


def test_budget_must_be_positive() -> None:
    with pytest.raises(ValueError):
        group_layers({"a": 1}, 0)


@given(sizes=sizes_strategy, budget=st.integers(1, 45))
def test_properties(sizes: dict[str, int], budget: int) -> None:
    groups = group_layers(sizes, budget)
    members = [m for g in groups for m in g.members]
    # Every key exactly once, within the budget, no empty group.
    assert sorted(members) == sorted(sizes)
    assert len(groups) <= budget
    assert all(g.members for g in groups)
    # Only one group is merged, and only when needed; then the budget is used fully.
    merged = [g for g in groups if len(g.members) > 1]
    assert len(merged) <= 1
    assert bool(merged) == (len(sizes) > budget)
    if merged:
        assert len(groups) == budget
        # Every package left alone is at least as large as every merged one.
        smallest_alone = min((sizes[g.members[0]] for g in groups if len(g.members) == 1), default=None)
        if smallest_alone is not None:
            assert smallest_alone >= max(sizes[m] for m in merged[0].members)
    # Caller order is kept: groups by first member, members within a group.
    position = {k: i for i, k in enumerate(sizes)}
    firsts = [position[g.members[0]] for g in groups]
    assert firsts == sorted(firsts)
    for g in groups:
        assert [position[m] for m in g.members] == sorted(position[m] for m in g.members)
    # Deterministic.
    assert group_layers(dict(sizes), budget) == groups
