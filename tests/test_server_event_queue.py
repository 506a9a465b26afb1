"""alpaca2.server.event_queue.EventQueue: the job events' queue (in place of asyncio.Queue)."""
import asyncio

import pytest

from alpaca2.server.event_queue import EventQueue


def test_items_come_out_in_order_and_get_waits_for_one():
    async def main():
        q = EventQueue()
        q.put_nowait(1)
        q.put_nowait(2)
        assert q.qsize() == 2 and not q.empty()
        assert await q.get() == 1
        assert q.get_nowait() == 2
        assert q.empty()
        with pytest.raises(asyncio.QueueEmpty):
            q.get_nowait()
        getter = asyncio.ensure_future(q.get())
        await asyncio.sleep(0)
        assert not getter.done()
        asyncio.get_running_loop().call_soon(q.put_nowait, 3)     # as the decode thread's callback does
        assert await asyncio.wait_for(getter, 1) == 3
    asyncio.run(main())


def test_a_cancelled_get_loses_no_item():
    async def main():
        q = EventQueue()
        first = asyncio.ensure_future(q.get())
        second = asyncio.ensure_future(q.get())
        await asyncio.sleep(0)
        q.put_nowait("a")          # wakes the first getter ...
        first.cancel()             # ... which is cancelled before it runs: the second gets the item
        assert await asyncio.wait_for(second, 1) == "a"
        with pytest.raises(asyncio.CancelledError):
            await first
        third = asyncio.ensure_future(q.get())
        await asyncio.sleep(0)
        third.cancel()
        await asyncio.sleep(0)
        q.put_nowait("b")          # the cancelled getter does not swallow it
        assert await asyncio.wait_for(q.get(), 1) == "b"
    asyncio.run(main())
