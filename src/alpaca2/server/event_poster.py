"""How the engine's events reach the event loops: (job, event) pairs handed to a thread of their
own, which wakes each job's loop (one call_soon_threadsafe per loop and batch).

Waking a loop writes to its self-pipe, and that system call releases the GIL: done on the decode
thread, the woken event loop would often take the GIL right then and hold it while it handled the
tokens (building and sending each chunk), with the decode thread waiting to build its next batch.
Handed over here instead (a SimpleQueue put, which keeps the GIL), the wake happens once the
decode thread lets go of the GIL in its next llama_decode, so the loop's work overlaps the
decode instead of delaying it.  Batches keep their order: one queue, one thread.
"""
from __future__ import annotations

import queue
import threading


def deliver(items):
    """On the event loop: each event into its job's queue (as (choice index, event))."""
    for job, ev in items:
        job.events.put_nowait((job.index, ev))


def post_now(items):
    """Hand (job, event) pairs to their event loops, one callback per loop."""
    by_loop = {}
    for job, ev in items:
        by_loop.setdefault(job.loop, []).append((job, ev))
    for loop, evs in by_loop.items():
        try:
            loop.call_soon_threadsafe(deliver, evs)
        except RuntimeError:        # the loop is closed: nobody is listening any more
            pass


class EventPoster:
    """The thread that wakes the event loops for the engine's threads."""

    def __init__(self):
        self._queue = queue.SimpleQueue()
        self._thread = None
        self._start_lock = threading.Lock()

    def post(self, items):
        """Queue (job, event) pairs for their loops; returns at once, holding on to the GIL."""
        if not items:
            return
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="alpaca2-events", daemon=True)
                    self._thread.start()
        self._queue.put(items)

    def _run(self):
        get = self._queue.get
        while True:
            items = get()
            if isinstance(items, threading.Event):      # flush(): everything before it was handed over
                items.set()
            else:
                post_now(items)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until what was posted so far is handed to its loops."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)
