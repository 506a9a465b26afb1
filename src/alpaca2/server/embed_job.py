"""A request to embed or rerank, as the embedding thread sees it (alpaca2.server.engine runs it)."""
from __future__ import annotations

from alpaca2.server.event_queue import EventQueue


class EmbedJob:
    """Token lists to embed (on the embedding thread, in a context of its own).

    rerank=True: each list is a query-document pair and its result is the pair's score (as
    llama-server's: the first value of the rank-pooled output), not a unit vector."""

    def __init__(self, inputs, loop, rerank=False):
        self.inputs = inputs
        self.rerank = rerank
        self.index = 0
        self.loop = loop
        self.events = EventQueue()
        self.cancelled = False

    def cancel(self):
        self.cancelled = True
