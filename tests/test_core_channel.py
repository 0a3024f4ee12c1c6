"""Channel: the bounded FIFO between stages, taken from in bulk."""

from __future__ import annotations

import asyncio

from flowbatch.channel import Channel


def test_take_many_takes_the_oldest_items_up_to_the_limit() -> None:
    ch: Channel[int] = Channel(8)
    for i in range(5):
        assert ch.put_nowait(i)
    assert ch.take_many(2) == [0, 1]
    assert ch.take_many(1) == [2]
    assert ch.take_many(10) == [3, 4]
    assert ch.take_many(10) == []
    assert len(ch) == 0


def test_take_many_wakes_a_producer_waiting_for_room() -> None:
    async def main() -> list[int]:
        ch: Channel[int] = Channel(2)
        ch.put_nowait(0)
        ch.put_nowait(1)
        producer = asyncio.create_task(ch.put(2))
        await asyncio.sleep(0)  # one loop turn: it parks on the full channel
        assert not producer.done()
        first = ch.take_many(32)
        await asyncio.wait_for(producer, 5)
        return first + ch.take_many(32)

    assert asyncio.run(main()) == [0, 1, 2]
