"""Engine._post: a job whose handler reads the whole answer (non-streamed) gets its text in one
event just before its end, so its event loop is not woken for every token; streamed jobs get every
text event as it comes."""
import pytest

pytest.importorskip("starlette")

from alpaca2.server.engine import Engine, Job  # noqa: E402


class Loop:
    def __init__(self):
        self.calls = []

    def call_soon_threadsafe(self, fn, items):
        self.calls.append(list(items))


def job(loop, coalesce):
    j = Job([1, 2], max_tokens=8, sampler=None, stop=[], strip_leading_space=False, ignore_eos=False, loop=loop)
    j.coalesce = coalesce
    return j


def test_text_is_held_until_the_end_when_coalescing():
    loop = Loop()
    whole, streamed = job(loop, True), job(loop, False)
    Engine._post([(whole, ("text", "Hel", [5], [{"p": 1}])), (streamed, ("text", "a", [7], []))])
    Engine._post([(whole, ("text", "lo", [6, 9], [{"p": 2}, {"p": 3}]))])
    Engine._post([(whole, ("end", "stop")), (streamed, ("end", "length"))])
    sent = [ev for call in loop.calls for ev in call]
    assert [ev for j, ev in sent if j is streamed] == [("text", "a", [7], []), ("end", "length")]
    assert [ev for j, ev in sent if j is whole] == [("text", "Hello", [5, 6, 9], [{"p": 1}, {"p": 2}, {"p": 3}]),
                                                   ("end", "stop")]
    assert len(loop.calls) == 2            # the held text woke nobody: one call with the streamed text, one at the end
    assert whole.held is None


def test_an_error_still_gets_the_text_before_it():
    loop = Loop()
    whole = job(loop, True)
    Engine._post([(whole, ("text", "ab", [1], []))])
    Engine._post([(whole, ("error", 500, "boom"))])
    assert loop.calls == [[(whole, ("text", "ab", [1], [])), (whole, ("error", 500, "boom"))]]
