"""alpaca2.server.event_poster: the engine's events reach their loops in order, from any thread."""
import asyncio
import threading

from alpaca2.server.event_poster import EventPoster
from alpaca2.server.event_queue import EventQueue


class FakeJob:
    def __init__(self, loop, index=0):
        self.loop, self.index, self.events = loop, index, EventQueue()


def test_events_arrive_in_order_and_flush_waits_for_them():
    async def main():
        loop = asyncio.get_running_loop()
        a, b = FakeJob(loop), FakeJob(loop, index=1)
        poster = EventPoster()
        poster.post([])                      # nothing: no thread needed
        def decode_thread():
            for i in range(200):
                poster.post([(a, ("text", str(i))), (b, ("text", str(i)))])
            poster.post([(a, ("end", "length")), (b, ("end", "length"))])
            assert poster.flush(10)
        t = threading.Thread(target=decode_thread)
        t.start()
        got = {0: [], 1: []}
        for job in (a, b):
            while True:
                index, ev = await asyncio.wait_for(job.events.get(), 10)
                got[index].append(ev)
                if ev[0] == "end":
                    break
        t.join()
        for index in (0, 1):
            assert [ev[1] for ev in got[index][:-1]] == [str(i) for i in range(200)]
    asyncio.run(main())


def test_a_closed_loop_is_skipped():
    loop = asyncio.new_event_loop()
    loop.close()
    poster = EventPoster()
    poster.post([(FakeJob(loop), ("text", "x"))])
    assert poster.flush(10)
