"""PrioritySlots (condery/common/slots.py): the CPU slots of layer builds, largest first."""

from __future__ import annotations

import asyncio

import pytest

from condery.common.slots import PrioritySlots


async def test_at_most_count_holders_and_the_largest_waiter_goes_first() -> None:
    slots = PrioritySlots(2)
    order: list[str] = []
    holding = 0
    most = 0
    gate = asyncio.Event()

    async def job(name: str, weight: float) -> None:
        nonlocal holding, most
        async with slots.taken(weight):
            holding += 1
            most = max(most, holding)
            order.append(name)
            await gate.wait()
            holding -= 1

    first = [asyncio.ensure_future(job(n, 1)) for n in ("a", "b")]  # take both slots
    await asyncio.sleep(0)
    waiting = [asyncio.ensure_future(job(n, w)) for n, w in (("small", 10), ("large", 10_000), ("mid", 500),
                                                                   ("tie-1", 500))]
    await asyncio.sleep(0)
    assert order == ["a", "b"]
    gate.set()
    await asyncio.gather(*first, *waiting)
    assert order == ["a", "b", "large", "mid", "tie-1", "small"] and most == 2


async def test_plain_async_with_is_weight_zero() -> None:
    slots = PrioritySlots(1)
    async with slots:
        later = asyncio.ensure_future(slots.__aenter__())
        await asyncio.sleep(0)
        assert not later.done()
    await later
    await slots.__aexit__(None, None, None)
    with pytest.raises(ValueError):
        PrioritySlots(0)


@pytest.mark.parametrize("round_", range(20))  # cancellation races: looped, a flaky test is a defect
async def test_a_cancelled_waiter_never_keeps_a_slot(round_: int) -> None:
    slots = PrioritySlots(1)
    async with slots.taken(1):
        cancelled = asyncio.ensure_future(slots.taken(100).__aenter__())
        other = asyncio.ensure_future(slots.taken(1).__aenter__())
        await asyncio.sleep(0)
        if round_ % 2:
            cancelled.cancel()  # cancelled while waiting
    if round_ % 2 == 0:
        cancelled.cancel()  # cancelled just as it was handed the slot
    await asyncio.gather(cancelled, return_exceptions=True)
    if cancelled.cancelled():
        await asyncio.wait_for(other, 1)  # the slot went on to the next waiter
    else:
        await slots.__aexit__(None, None, None)
        await asyncio.wait_for(other, 1)
    await slots.__aexit__(None, None, None)
    async with slots.taken(5):  # and it is free again
        pass
