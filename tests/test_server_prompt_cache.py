"""llama-server's host-memory prompt cache (--cache-ram, --cache-idle-slots) in alpaca2 serve.

First the cache itself on a real Context of the tiny model (save, load, containment, LRU eviction
under the byte limit, the token limit), then a server subprocess: a prompt whose slot was given up
comes back from host memory with the same greedy answer as the cold run, and fewer prompt tokens
decoded; --cache-ram 0 and --no-cache-idle-slots turn it off.
"""
import logging

import pytest

import alpaca2
from alpaca2.server import prompt_cache
from alpaca2.server.prompt_cache import MiB, PromptCache, pick_slot, wants_update

PROMPT = ("Once upon a time in a land far away, there lived a brave knight who traveled across mountains "
          "and rivers to find the legendary golden sword hidden deep within the enchanted forest.")
OTHER = "The quick brown fox"


class FakeSlot:
    def __init__(self, seq_id, tokens=(), last_used=0):
        self.seq_id = seq_id
        self.tokens = list(tokens)
        self.last_used = last_used
        self.job = None


@pytest.fixture
def ctx(model):
    c = alpaca2.Context(model, n_ctx=512, n_batch=128, n_seq_max=2, kv_unified=True, n_threads=1,
                        type_k="f32", type_v="f32", flash_attn=False)
    yield c
    c.close()


def fill(ctx, slot, tokens):
    """Decode tokens into slot's sequence (from position 0) and record them."""
    ctx.seq_rm(slot.seq_id, 0, -1)
    ctx.decode(tokens, seq_id=slot.seq_id)
    slot.tokens = list(tokens)


def ids(model, text):
    return model.tokenize(text, add_bos=True, special=False)


def test_save_then_load_restores_the_same_logits(model, ctx):
    toks = ids(model, PROMPT)
    slot = FakeSlot(0)
    fill(ctx, slot, toks)
    ctx.decode([toks[-1]], seq_id=1)     # something else in the shared cache meanwhile
    cache = PromptCache(0, 0)
    assert cache.save(ctx, slot) and len(cache.states) == 1
    assert not cache.save(ctx, slot)            # already there
    ctx.seq_rm(0, 0, -1)
    slot.tokens = []
    assert cache.load(ctx, slot, toks + ids(model, " and more")[1:])
    assert slot.tokens == toks and cache.states == []        # moved out of the cache into the slot
    # decoding the next token on the restored state gives what a cold run gives
    nxt = ids(model, " The")[1:2]
    ctx.decode(nxt, seq_id=0)
    warm = list(ctx.logits)
    cold = alpaca2.Context(model, n_ctx=512, n_batch=128, n_threads=1, type_k="f32", type_v="f32",
                           flash_attn=False)
    try:
        cold.decode(toks + nxt)
        assert warm == pytest.approx(list(cold.logits), abs=1e-4)
    finally:
        cold.close()


def test_load_takes_only_a_better_prompt(model, ctx):
    toks = ids(model, PROMPT)
    other = ids(model, OTHER)
    cache = PromptCache(0, 0)
    slot = FakeSlot(0)
    fill(ctx, slot, toks)
    cache.save(ctx, slot)
    fill(ctx, slot, other)
    assert cache.load(ctx, slot, other) and slot.tokens == other and len(cache.states) == 1   # slot is better
    assert cache.load(ctx, slot, toks[:len(toks) // 5]) and slot.tokens == other       # keeps < 1/4 of it
    assert cache.load(ctx, slot, toks[:len(toks) // 2]) and slot.tokens == toks and not cache.states


def test_containment(model, ctx):
    toks = ids(model, PROMPT)
    cache = PromptCache(0, 0)
    slot = FakeSlot(0)
    fill(ctx, slot, toks[:20])
    assert cache.save(ctx, slot)
    fill(ctx, slot, toks)                       # extends the cached one: that one goes
    assert cache.save(ctx, slot)
    assert [len(s.tokens) for s in cache.states] == [len(toks)]
    fill(ctx, slot, toks[:30])                  # contained in a cached one: not saved
    assert not cache.save(ctx, slot)


def test_states_are_keyed_by_lora_scales(model, ctx):
    """A state computed with one set of LoRA scales is never loaded for a request with others, and
    the same tokens under other scales are cached apart (key_of: the engine's LoraSet.kv_key)."""
    toks = ids(model, PROMPT)
    scales = {0: (1.0,)}
    cache = PromptCache(0, 0, key_of=lambda slot: scales[slot.seq_id])
    slot = FakeSlot(0)
    fill(ctx, slot, toks)
    assert cache.save(ctx, slot)
    scales[0] = (0.5,)
    assert cache.save(ctx, slot)                # same tokens, other scales: a second state
    assert [st.key for st in cache.states] == [(1.0,), (0.5,)]
    ctx.seq_rm(0, 0, -1)
    slot.tokens = []
    scales[0] = (0.0,)                          # a request with scales nothing was cached for
    assert cache.load(ctx, slot, toks) and slot.tokens == [] and len(cache.states) == 2
    scales[0] = (1.0,)
    assert cache.load(ctx, slot, toks) and slot.tokens == toks
    assert [st.key for st in cache.states] == [(0.5,)]


def test_lru_eviction_under_the_byte_limit(model, ctx):
    slot = FakeSlot(0)
    prompts = [ids(model, f"story number {i}: " + PROMPT) for i in range(4)]
    fill(ctx, slot, prompts[0])
    one = len(ctx.save_seq_state(0))
    cache = PromptCache(int(one * 2.5), 0)      # room for two
    for p in prompts:
        fill(ctx, slot, p)
        assert cache.save(ctx, slot)
        cache.update()
        assert cache.size <= cache.limit_bytes
    assert [s.tokens for s in cache.states] == prompts[2:]      # the oldest went first
    # a state that alone passes the limit is not kept (it would push out everything)
    small = PromptCache(one // 2, 0)
    assert not small.save(ctx, slot) and small.states == []
    # a loaded state leaves the cache: what is loaded is the least recently used no more
    fill(ctx, slot, ids(model, OTHER))
    assert cache.load(ctx, slot, prompts[2]) and [s.tokens for s in cache.states] == [prompts[3]]


def test_token_limit_without_a_byte_limit(model, ctx):
    slot = FakeSlot(0)
    cache = PromptCache(0, 100)                 # --cache-ram -1: n_ctx tokens at most
    prompts = [ids(model, f"tale {i}: " + PROMPT)[:40] for i in range(3)]
    for p in prompts:
        fill(ctx, slot, p)
        cache.save(ctx, slot)
        cache.update()
    assert [s.tokens for s in cache.states] == prompts[1:]


def test_make_reads_the_flags(caplog):
    with caplog.at_level(logging.DEBUG, logger="alpaca2.server"):
        assert prompt_cache.make(0, 512) is None
        assert "__TEST_TAG_CACHE_IDLE_SLOTS_ENABLED__" not in caplog.text
        c = prompt_cache.make(3, 512, kv_unified=True)
        assert c.limit_bytes == 3 * MiB and c.limit_tokens == 512 and c.idle_slots and c.kv_unified
        assert "__TEST_TAG_CACHE_IDLE_SLOTS_ENABLED__" in caplog.text
        caplog.clear()
        assert prompt_cache.make(-1, 512, idle_slots=False).limit_bytes == 0
        assert "__TEST_TAG_CACHE_IDLE_SLOTS_ENABLED__" not in caplog.text


def test_idle_slots_saved_and_cleared_with_kv_unified(model, ctx):
    toks = ids(model, PROMPT)
    busy, idle = FakeSlot(0), FakeSlot(1)
    fill(ctx, idle, toks)
    busy.job = object()
    keep = PromptCache(0, 0, idle_slots=True, kv_unified=False)
    keep.cache_idle(ctx, [busy, idle])
    assert idle.tokens == toks and len(keep.states) == 1
    clear = PromptCache(0, 0, idle_slots=True, kv_unified=True)
    clear.cache_idle(ctx, [busy, idle])
    assert idle.tokens == [] and len(clear.states) == 1 and ctx.n_past(1) == 0
    off = PromptCache(0, 0, idle_slots=False, kv_unified=True)
    fill(ctx, idle, toks)
    off.cache_idle(ctx, [busy, idle])
    assert idle.tokens == toks and off.states == []


def test_slot_choice_and_when_the_cache_is_consulted():
    prompt = list(range(1, 41))
    near = FakeSlot(0, prompt[:30] + [99], last_used=5)
    far = FakeSlot(1, [1, 2, 99], last_used=1)          # 2 of 40 in common: not similar
    old = FakeSlot(2, [], last_used=0)
    assert pick_slot([near, far, old], prompt) is near
    assert pick_slot([far, old], prompt) is old           # none similar: the least recently used
    assert wants_update(far.tokens, prompt, by_id=False)  # chosen by LRU: save, look in the cache
    assert not wants_update(near.tokens, prompt, by_id=False)      # keeps 30 of 31
    assert wants_update(prompt[:8] + list(range(100, 130)), prompt, by_id=False)   # similar, keeps < 1/2
    assert wants_update(far.tokens, prompt, by_id=True)
    assert not wants_update([], prompt, by_id=True)       # llama-server: an empty slot asked for by id


# -- the server ----------------------------------------------------------------------------------

httpx = pytest.importorskip("httpx")


def complete(server, prompt, slot=-1):
    from server_process import NO_EOS
    r = httpx.post(server.url + "/completion", json={"prompt": prompt, "n_predict": 8, "temperature": 0,
                                                     "logit_bias": NO_EOS, "id_slot": slot, "cache_prompt": True},
                   timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def start(tiny_path, *flags):
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from server_process import ServerProcess
    return ServerProcess(tiny_path, "-c", "1024", "-v", *flags)


def log_text(server):
    return "".join(server.lines)


@pytest.mark.parametrize("cache_ram", ["100", "0"])
def test_given_up_prompt_comes_back_from_host_memory(tiny_path, cache_ram):
    s = start(tiny_path, "-np", "1", "--cache-ram", cache_ram)
    try:
        cold = complete(s, PROMPT)
        complete(s, OTHER)                       # takes the only slot: the first prompt goes to the cache
        warm = complete(s, PROMPT)
        assert warm["content"] == cold["content"]
        if cache_ram == "0":
            assert warm["timings"]["cache_n"] <= 1 and warm["timings"]["prompt_n"] >= cold["timings"]["prompt_n"] - 1
            assert "updating prompt cache" not in log_text(s)
        else:
            assert warm["timings"]["cache_n"] == cold["tokens_evaluated"] - 1
            assert warm["timings"]["prompt_n"] == 1 < cold["timings"]["prompt_n"]
            assert "updating prompt cache" in log_text(s)
    finally:
        s.stop()


@pytest.mark.parametrize("idle_slots", [True, False])
def test_idle_slots_with_kv_unified(tiny_path, idle_slots):
    s = start(tiny_path, "-np", "2", "-kvu", "--cache-ram", "100", *([] if idle_slots else ["--no-cache-idle-slots"]))
    try:
        cold = complete(s, PROMPT, slot=0)
        assert "__TEST_TAG_CACHE_IDLE_SLOT__" not in log_text(s)
        complete(s, OTHER, slot=1)               # slot 0 is idle now
        assert ("__TEST_TAG_CACHE_IDLE_SLOTS_ENABLED__" in log_text(s)) == idle_slots
        assert ("__TEST_TAG_CACHE_IDLE_SLOT__" in log_text(s)) == idle_slots
        if idle_slots:                           # slot 0 was emptied; its prompt comes back from the cache
            warm = complete(s, PROMPT)
            assert "updating prompt cache" in log_text(s)
        else:                                    # slot 0 kept its tokens
            warm = complete(s, PROMPT, slot=0)
        assert warm["timings"]["cache_n"] == cold["tokens_evaluated"] - 1
        assert warm["content"] == cold["content"]
    finally:
        s.stop()


def test_out_of_memory_shrinks_the_limit(model, ctx):
    slot = FakeSlot(0)
    fill(ctx, slot, ids(model, PROMPT))
    cache = PromptCache(100 * MiB, 0)
    assert cache.save(ctx, slot)
    held = cache.size

    class NoMemory:
        def checkpoint_seq(self, seq_id, full=False):
            raise MemoryError
    slot.tokens = ids(model, OTHER)
    assert not cache.save(NoMemory(), slot)
    assert cache.limit_bytes == int(0.4 * held) and cache.states == []    # llama-server's reaction


def test_sleep_gives_the_cache_back(model):
    import asyncio
    from alpaca2.server.engine import Engine
    engine = Engine(model, n_ctx=256, parallel=1, n_batch=64, n_threads=1, cache_ram=16)
    try:
        assert engine.prompt_cache.limit_bytes == 16 * MiB and engine.prompt_cache.idle_slots
        engine.prompt_cache.states.append(prompt_cache.CachedPrompt([1, 2, 3], b"x"))
        assert asyncio.run(engine.sleep()) and engine.prompt_cache.states == []
    finally:
        engine.stop()
    off = Engine(model, n_ctx=256, parallel=1, n_batch=64, n_threads=1)      # the library's default: none
    try:
        assert off.prompt_cache is None
    finally:
        off.stop()


def test_common_prefix_equals_a_token_by_token_scan():
    """common_prefix compares 256-token slices first; it must give what a plain scan gives,
    whatever the lengths and wherever (if anywhere) the first difference is."""
    import random
    from alpaca2.server.prompt_cache import common_prefix

    def scan(a, b):
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n

    rng = random.Random(1)
    for _ in range(3000):
        la, lb = rng.randint(0, 700), rng.randint(0, 700)
        base = [rng.randint(0, 3) for _ in range(max(la, lb))]
        a, b = base[:la], base[:lb]
        if b and rng.random() < 0.7:
            b[rng.randrange(len(b))] = 9
        assert common_prefix(a, b) == scan(a, b)
