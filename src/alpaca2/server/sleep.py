"""llama-server's --sleep-idle-seconds: after that long with nothing to do, the server frees its
contexts (the KV caches and compute buffers, the memory it holds while idle; the model stays
loaded) and /props says is_sleeping.  Reading endpoints (/health, /props, /models, /metrics, /slots)
leave it asleep; any other request wakes it first, and a job that reaches the decode thread while it
sleeps wakes it too.
"""
from __future__ import annotations

import asyncio
import time

READ_ONLY = frozenset(("/health", "/v1/health", "/props", "/models", "/v1/models", "/metrics", "/slots"))
STREAMS = frozenset(("/v1/stream", "/v1/streams/lookup"))      # replays of recorded streams need no model


def reads_state(method: str, path: str) -> bool:
    """A monitoring read (health, props, models, metrics, slots): it leaves the server asleep, and
    /metrics does not count it when it succeeds (a scrape would change what the next one reads)."""
    return method == "GET" and (path in READ_ONLY or path.startswith("/v1/models/"))


class SleepWatch:
    """Counts the requests in flight and puts the engine to sleep after idle_s seconds without one."""

    def __init__(self, engine, idle_s: float):
        self.engine = engine
        self.idle_s = idle_s
        self.inflight = 0
        self.last_active = time.monotonic()
        self._task = None

    def wakes(self, method: str, path: str) -> bool:
        return not (reads_state(method, path) or method == "OPTIONS" or path in STREAMS)

    def start(self):
        """Start watching (in the server's event loop, once it runs)."""
        if self._task is None:
            self.last_active = time.monotonic()
            self._task = asyncio.ensure_future(self._watch())

    async def enter(self):
        self.start()
        self.inflight += 1
        if self.engine.sleeping:
            await self.engine.wake()

    def leave(self):
        self.inflight -= 1
        self.last_active = time.monotonic()

    async def _watch(self):
        while True:
            await asyncio.sleep(min(0.25, self.idle_s / 4))
            e = self.engine
            if e.sleeping or self.inflight or e.busy_slots or e.queue_length:
                continue
            if time.monotonic() - self.last_active >= self.idle_s:
                try:
                    await e.sleep()
                except Exception:             # shutting down
                    return
