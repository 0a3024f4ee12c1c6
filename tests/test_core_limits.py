"""The one in-flight limiter (flowbatch.limits.CapacityLimiter)."""

from __future__ import annotations

import asyncio
import math

import pytest

import flowbatch as fb
from flowbatch.limits import CapacityLimiter


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_fail_fast_entry_takes_places_whole_or_counts_a_rejection() -> None:
    lim = CapacityLimiter(4)
    assert lim.try_acquire(3)
    assert not lim.try_acquire(2)  # 3 + 2 > 4: none taken
    assert lim.borrowed == 3
    with pytest.raises(fb.Overloaded, match="3 of 4 items in flight"):
        lim.acquire_nowait(2)
    lim.acquire_nowait(1)
    s = lim.statistics()
    assert (s.borrowed, s.admitted, s.rejected, s.waiting) == (4, 2, 2, 0)
    lim.release(4)
    assert lim.available == 4


def test_waiters_are_served_in_order_and_a_large_one_is_not_overtaken() -> None:
    async def main() -> None:
        lim = CapacityLimiter(4)
        lim.acquire_nowait(4)
        order: list[str] = []

        async def take(name: str, n: int) -> None:
            await lim.acquire(n)
            order.append(name)

        big = asyncio.create_task(take("big", 3))
        small = asyncio.create_task(take("small", 1))
        await asyncio.sleep(0)  # both are in line now
        assert lim.waiting == 2
        assert not lim.try_acquire(1)  # a fail-fast caller does not jump the line
        lim.release(1)  # room for `small`, but `big` is first in line
        await asyncio.sleep(0)
        assert order == []
        lim.release(3)  # 4 free: big goes first, then small fits too
        await asyncio.gather(big, small)
        assert order == ["big", "small"]
        assert lim.borrowed == 4

    run(main())


def test_a_cancelled_waiter_leaves_the_line_and_wakes_those_behind_it() -> None:
    async def main() -> None:
        lim = CapacityLimiter(2)
        lim.acquire_nowait(2)
        first = asyncio.create_task(lim.acquire(2))
        second = asyncio.create_task(lim.acquire(1))
        await asyncio.sleep(0)
        lim.release(1)  # 1 free: second is behind first, waits
        await asyncio.sleep(0)
        assert not second.done()
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await second  # woken once first left the line
        assert lim.borrowed == 2
        assert lim.waiting == 0

    run(main())


def test_a_waiter_granted_as_it_is_cancelled_gives_its_places_back() -> None:
    async def main() -> None:
        lim = CapacityLimiter(1)
        lim.acquire_nowait(1)
        waiter = asyncio.create_task(lim.acquire(1))
        await asyncio.sleep(0)
        lim.release(1)  # grants the waiter ...
        waiter.cancel()  # ... which is cancelled before it runs
        await asyncio.gather(waiter, return_exceptions=True)
        assert lim.borrowed == 0

    run(main())


def test_resizing_wakes_waiters_and_a_shrink_drains_below_the_new_total() -> None:
    async def main() -> None:
        lim = CapacityLimiter(2)
        lim.acquire_nowait(2)
        waiter = asyncio.create_task(lim.acquire(2))
        await asyncio.sleep(0)
        lim.total = 4
        await waiter
        assert lim.borrowed == 4
        lim.total = 1
        assert lim.available == 0
        assert not lim.try_acquire(1)
        lim.release(3)
        assert not lim.try_acquire(1)  # 1 held, total 1
        lim.release(1)
        assert lim.try_acquire(1)

    run(main())


def test_unlimited_counts_but_never_refuses() -> None:
    lim = CapacityLimiter(math.inf)
    assert all(lim.try_acquire(1000) for _ in range(10))
    assert lim.borrowed == 10_000
    assert lim.rejected == 0


@pytest.mark.parametrize("total", [0, -1, 1.5, "8", True])
def test_a_bad_total_is_refused_with_a_message(total: object) -> None:
    with pytest.raises((ValueError, TypeError), match="total must be"):
        CapacityLimiter(total)  # type: ignore[arg-type]


def test_releasing_more_than_is_held_is_a_bug_caught_at_once() -> None:
    lim = CapacityLimiter(3)
    lim.acquire_nowait(1)
    with pytest.raises(RuntimeError, match="only 1 are held"):
        lim.release(2)


def test_asking_more_than_the_total_to_wait_for_fails_instead_of_hanging() -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="3 places asked of a limiter of 2"):
            await CapacityLimiter(2).acquire(3)

    run(main())


@pytest.mark.parametrize("n", [0, -1])
def test_a_count_below_one_is_refused_and_leaves_the_limiter_as_it_was(n: int) -> None:
    """acquire_nowait(-1) made borrowed -1 (every later release then failed)."""
    lim = CapacityLimiter(4)
    with pytest.raises(ValueError, match=f"places must be >= 1, got {n}"):
        lim.acquire_nowait(n)
    with pytest.raises(ValueError, match=f"places must be >= 1, got {n}"):
        lim.release(n)

    async def main() -> None:
        with pytest.raises(ValueError, match=f"places must be >= 1, got {n}"):
            await lim.acquire(n)

    run(main())
    stats = lim.statistics()
    assert (stats.borrowed, stats.admitted, stats.rejected) == (0, 0, 0)


def test_asking_more_than_the_total_now_says_it_can_never_fit() -> None:
    """Was Overloaded 'at capacity: 0 of 2 in flight', inviting a retry that never succeeds."""
    lim = CapacityLimiter(2)
    with pytest.raises(ValueError, match="3 places asked of a limiter of 2"):
        lim.acquire_nowait(3)
    assert lim.statistics().rejected == 0
