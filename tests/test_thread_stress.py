"""Thread stress: several threads close, decode, sample, tokenize, save and fill batches at once.

Runs in a fresh interpreter for a bounded time (a few seconds); every operation either works or
raises one of alpaca2's exceptions (ClosedError and the like), and the process ends cleanly.
The figures (operations run, exceptions by type) are printed; run with -s to see them.
"""
import json
import textwrap

from conftest import run_python

STRESS = """
import json, random, threading, time, traceback
import numpy as np
import alpaca2

PATH, SECONDS, SEED = {path!r}, {seconds!r}, {seed!r}
rng = random.Random(SEED)
lock = threading.Lock()
ops, errors, unexpected = {{}}, {{}}, []
shared = {{}}


def fresh():
    m = alpaca2.Model(PATH)
    c = alpaca2.Context(m, n_ctx=256, n_batch=32, n_threads=1)
    s = alpaca2.Sampler(temp=0.8, seed=1, repeat_penalty=1.1)
    g = alpaca2.SamplerChain().add("grammar", m, 'root ::= [a-z ]+').add("dist", seed=2)
    shared.update(model=m, ctx=c, sampler=s, grammar=g, batch=alpaca2.Batch(16))


def count(table, key):
    with lock:
        table[key] = table.get(key, 0) + 1


def op_tokenize():
    m = shared["model"]
    m.detokenize(m.tokenize("床前明月光，疑是地上霜。 hello world"))

def op_decode():
    c = shared["ctx"]
    if c.n_past() > 200:
        c.clear()
    c.decode([5 + rng.randrange(700) for _ in range(rng.randrange(1, 20))])

def op_decode_token():
    c = shared["ctx"]
    if c.n_past() > 200:
        c.clear()
    c.decode_token(5 + rng.randrange(700))

def op_sample():
    shared["sampler"].sample(shared["ctx"])

def op_sample_grammar():
    shared["grammar"].sample(shared["ctx"])

def op_logits():
    float(shared["ctx"].logits.sum())

def op_save_load():
    c = shared["ctx"]
    c.load_state(c.save_state())

def op_n_past():
    shared["ctx"].n_past()

def op_batch_add():
    b = shared["batch"]
    if len(b) >= 16 or rng.random() < 0.1:
        b.clear()
    p = shared["ctx"].n_past()
    b.add(5 + rng.randrange(700), p + len(b) if rng.random() < 0.8 else rng.randrange(300), 0, logits=True)

def op_decode_batch():
    shared["ctx"].decode_batch(shared["batch"])

def op_close_ctx():
    time.sleep(0.02)
    shared["ctx"].close()

def op_close_sampler():
    time.sleep(0.02)
    shared["sampler"].close()

def op_close_model():
    time.sleep(0.05)
    shared["model"].close()

def op_renew():
    time.sleep(0.1)
    with lock:
        fresh()

WORK = [op_tokenize, op_decode, op_decode_token, op_sample, op_sample_grammar, op_logits, op_save_load,
        op_n_past, op_batch_add, op_batch_add, op_decode_batch]
OPS = WORK * 4 + [op_close_ctx, op_close_sampler, op_close_model, op_renew, op_renew]


def worker(i):
    r = random.Random(SEED * 100 + i)
    end = time.monotonic() + SECONDS
    while time.monotonic() < end:
        op = r.choice(OPS)
        count(ops, op.__name__)
        try:
            op()
        except alpaca2.Alpaca2Error as e:
            count(errors, type(e).__name__)
        except (ValueError, IndexError) as e:          # "no logits: decode first" and the like
            count(errors, type(e).__name__)
        except Exception:
            unexpected.append(traceback.format_exc())


fresh()
threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("RESULT " + json.dumps({{"ops": ops, "errors": errors, "unexpected": unexpected[:3],
                              "n_unexpected": len(unexpected)}}))
"""


def test_six_threads_closing_decoding_sampling_tokenizing_and_saving(tiny_path):
    code = textwrap.dedent(STRESS).format(path=str(tiny_path), seconds=3.0, seed=14)
    r = run_python(code, timeout=300)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    result = json.loads(r.stdout.split("RESULT ", 1)[1])
    print("\nthread stress:", json.dumps(result, sort_keys=True))
    assert result["n_unexpected"] == 0, result["unexpected"]
    assert sum(result["ops"].values()) > 200, result
    assert set(result["errors"]) <= {"ClosedError", "ValueError", "IndexError", "SamplerError",
                                     "StateError", "ContextFullError", "GrammarError", "InvalidBatchError"}, result
    assert result["errors"].get("ClosedError", 0) > 0, result      # the closes did race the calls
