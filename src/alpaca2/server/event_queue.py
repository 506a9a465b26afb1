"""The queue a job's events arrive in: the decode thread's callback puts them (on the event loop),
one handler awaits them.

What asyncio.Queue offers this use (put_nowait, get, get_nowait, empty, qsize), without what it
does not need (a size limit, putters waiting, task_done/join): a deque and at most one waiting
getter.  It runs once per streamed token, so the few calls it saves count.
"""
from __future__ import annotations

import asyncio
import collections


class EventQueue:
    """A FIFO of events for one consumer task at a time (more may wait: each is woken in turn)."""

    __slots__ = ("_items", "_waiters")

    def __init__(self):
        self._items = collections.deque()
        self._waiters = collections.deque()      # futures of get() calls waiting for an item

    def put_nowait(self, item):
        self._items.append(item)
        waiters = self._waiters
        while waiters:
            w = waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    async def get(self):
        items = self._items
        while not items:
            w = asyncio.get_running_loop().create_future()
            self._waiters.append(w)
            try:
                await w
            except BaseException:
                w.cancel()
                if items and not w.cancelled():      # (woken, then cancelled): wake the next one
                    self._wake_next()
                raise
        return items.popleft()

    def _wake_next(self):
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    def get_nowait(self):
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)
