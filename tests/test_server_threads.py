"""The server computes the slots' graphs on one thread only (the decode thread, warm-up included), and
the embedding thread ends when idle: libgomp keeps a pool of OpenMP workers per thread that ever
computed a graph, and once it holds more threads than there are cores its workers barely spin
before they sleep, which cost 4-5% of tg at -t = cores (2 threads on 2 cores: 1 client 0.95x
llama-server).  Counted in a fresh interpreter, where no other test has made pools."""
import textwrap

import pytest

from conftest import run_python

pytest.importorskip("starlette")


@pytest.mark.parametrize("spec", [(), ("ngram-simple",)])
def test_one_openmp_pool_for_decoding_and_none_left_by_embeddings(tiny_path, spec):
    code = textwrap.dedent(f"""
        import os, time
        import alpaca2
        from alpaca2.server.embed_job import EmbedJob
        from alpaca2._core import Sampler
        from alpaca2.server.engine import Engine, Job

        def threads():
            return len(os.listdir("/proc/self/task"))

        class Loop:                       # what the engine posts to: run the delivery at once
            def call_soon_threadsafe(self, fn, items):
                fn(items)

        model = alpaca2.Model({str(tiny_path)!r})
        base = threads()
        engine = Engine(model, n_ctx=256, parallel=2, n_batch=64, n_threads=2, spec_types={spec!r})
        gen = Job([1, 5, 9], max_tokens=4, sampler=Sampler().add("greedy"), stop=[], strip_leading_space=False,
                  ignore_eos=True, loop=Loop())
        assert engine.submit(gen)
        for _ in range(300):
            if gen.t_end is not None:
                break
            time.sleep(0.05)
        # the decode thread and its one OpenMP worker: the warm-up made no pool on this thread
        print("after-generation", threads() - base)
        job = EmbedJob([[1, 5, 9, 12]], Loop())
        assert engine.submit(job)
        ev = None
        for _ in range(300):
            if not job.events.empty() and engine._emb_thread is None:
                break
            time.sleep(0.05)
        ev = job.events.get_nowait()
        print("event", ev[1][0])
        for _ in range(100):          # the embedding thread and its workers end
            if threads() - base == 2:
                break
            time.sleep(0.05)
        print("after-embedding", threads() - base)
        engine.stop()
    """)
    r = run_python(code, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert lines["after-generation"] == "2"
    assert lines["event"] != "error"
    assert lines["after-embedding"] == "2"
