"""llama-server's /slots/{id}?action=save|restore|erase on alpaca2 serve: a slot's KV cache to a
file (llama_state_seq_save_file's format) and back, into the same slot or another one.

A real server subprocess with the tiny model; greedy answers from a restored slot must equal the
answers of the slot that computed the cache, and damaged files must get 400, never a crash.
"""
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from server_process import NO_EOS, ServerProcess  # noqa: E402

PROMPT = "Once upon a time there was a little dragon who lived"


@pytest.fixture(scope="module")
def save_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("slots")


@pytest.fixture(scope="module")
def server(tiny_path, save_dir):
    s = ServerProcess(tiny_path, "-np", "2", "-c", "1024", "-n", "8", "--slot-save-path", str(save_dir))
    yield s
    s.stop()


def post(server, path, body=None):
    return httpx.post(server.url + path, json=body if body is not None else {}, timeout=120)


def complete(server, slot, prompt=PROMPT):
    r = post(server, "/completion", {"prompt": prompt, "n_predict": 8, "temperature": 0, "logit_bias": NO_EOS,
                                     "id_slot": slot, "cache_prompt": True})
    assert r.status_code == 200, r.text
    return r.json()


def test_save_restore_into_another_slot_and_erase(server, save_dir):
    first = complete(server, 1)
    n_prompt = first["tokens_evaluated"]
    saved = post(server, "/slots/1?action=save", {"filename": "one.bin"})
    assert saved.status_code == 200, saved.text
    d = saved.json()
    assert d["id_slot"] == 1 and d["filename"] == "one.bin"
    # the slot holds the prompt and the answer's tokens but the last (sampled, never decoded)
    assert d["n_saved"] == n_prompt + 8 - 1
    assert d["n_written"] == (save_dir / "one.bin").stat().st_size and "save_ms" in d["timings"]
    assert (save_dir / "one.bin").read_bytes()[:4] == b"qsgg"

    restored = post(server, "/slots/0?action=restore", {"filename": "one.bin"})
    assert restored.status_code == 200, restored.text
    r = restored.json()
    assert r["id_slot"] == 0 and r["n_restored"] == d["n_saved"] and r["n_read"] == d["n_written"]

    again = complete(server, 0)                  # slot 0 reuses the restored cache
    assert again["timings"]["cache_n"] == n_prompt - 1 and again["content"] == first["content"]

    erased = post(server, "/slots/0?action=erase")
    assert erased.status_code == 200 and erased.json() == {"id_slot": 0, "n_erased": again["tokens_evaluated"] + 7}
    cold = complete(server, 0)
    assert cold["timings"]["cache_n"] == 0 and cold["content"] == first["content"]


@pytest.mark.parametrize("path, body, status, words", [
    ("/slots/0?action=save", {"filename": "../escape.bin"}, 400, "Invalid filename"),
    ("/slots/0?action=save", {"filename": "a/b.bin"}, 400, "Invalid filename"),
    ("/slots/0?action=save", {"filename": ""}, 400, "Invalid filename"),
    ("/slots/0?action=save", {}, 400, "Invalid filename"),
    ("/slots/0?action=save", {"filename": 7}, 400, "Invalid filename"),
    ("/slots/9?action=save", {"filename": "x.bin"}, 400, "Invalid slot ID"),
    ("/slots/one?action=save", {"filename": "x.bin"}, 400, "Invalid slot ID"),
    ("/slots/0?action=fly", {"filename": "x.bin"}, 400, "Invalid action"),
    ("/slots/0?action=restore", {"filename": "missing.bin"}, 400, "no file"),
])
def test_bad_requests_get_400(server, path, body, status, words):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_a_damaged_file_gets_400_and_leaves_the_slot_empty(server, save_dir):
    complete(server, 1)
    assert post(server, "/slots/1?action=save", {"filename": "good.bin"}).status_code == 200
    data = (save_dir / "good.bin").read_bytes()
    for name, blob in [("short.bin", data[:40]), ("magic.bin", b"xxxx" + data[4:]),
                       ("cut.bin", data[:-5]), ("empty.bin", b""),
                       ("count.bin", data[:8] + (10 ** 6).to_bytes(4, "little") + data[12:])]:
        (save_dir / name).write_bytes(blob)
        complete(server, 0)
        r = post(server, "/slots/0?action=restore", {"filename": name})
        assert r.status_code == 400, (name, r.text)
        assert "Unable to restore slot" in r.json()["error"]["message"]
        assert complete(server, 0)["timings"]["cache_n"] == 0, name       # nothing half-restored
    assert server.proc.poll() is None


def test_without_a_save_path_slot_actions_are_not_supported(tiny_path):
    s = ServerProcess(tiny_path, "-np", "1", "-c", "256")
    try:
        r = post(s, "/slots/0?action=save", {"filename": "x.bin"})
        assert r.status_code == 501 and "--slot-save-path" in r.json()["error"]["message"]
    finally:
        s.stop()


@pytest.mark.parametrize("arch", ["mamba", "hybrid"])
def test_a_recurrent_slot_decodes_a_changed_prompt_again(arch, mamba_path, hybrid_path):
    """A recurrent state is kept whole or not at all: a slot's next prompt that shares only a prefix
    with what it holds is decoded again from the start (it was a 500: the cache refused to drop its
    last positions).  Without checkpoints (--ctx-checkpoints 0).  Greedy answers equal a fresh server's."""
    path = {"mamba": mamba_path, "hybrid": hybrid_path}[arch]
    prompts = ["the cat sat on the mat", "the cat sat on a hat", "the cat sat on the mat", "the cat"]
    body = {"n_predict": 12, "temperature": 0, "logit_bias": NO_EOS, "return_tokens": True}

    def ask(server, prompt):
        r = httpx.post(server.url + "/completion", json=dict(body, prompt=prompt), timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    s = ServerProcess(path, "-np", "1", "-c", "256", "--ctx-checkpoints", "0")
    try:
        reused = [ask(s, p) for p in prompts]
    finally:
        s.stop()
    fresh = []
    for p in prompts:                    # each prompt in a new server: nothing to reuse
        s = ServerProcess(path, "-np", "1", "-c", "256")
        try:
            fresh.append(ask(s, p))
        finally:
            s.stop()
    assert [r["timings"]["cache_n"] for r in reused][1:3] == [0, 0]     # only a prefix in common: again
    assert [r["tokens"] for r in reused] == [r["tokens"] for r in fresh]


@pytest.mark.parametrize("arch", ["mamba", "hybrid"])
def test_a_recurrent_slot_starts_from_its_checkpoint(arch, mamba_path, hybrid_path):
    """llama-server's context checkpoints: a recurrent model's slot is checkpointed 4 tokens before its
    prompt's end, and a later prompt that shares that much starts there instead of from scratch
    (the conversation re-rendered a little differently, say).  Greedy answers equal a fresh server's;
    --ctx-checkpoints 0 makes none."""
    path = {"mamba": mamba_path, "hybrid": hybrid_path}[arch]
    first = [1] + list(range(10, 40))
    second = first[:-3] + [50, 51, 52, 53]                    # shares 28 tokens with the first
    body = {"n_predict": 10, "temperature": 0, "logit_bias": NO_EOS, "return_tokens": True}

    def ask(server, prompt):
        r = httpx.post(server.url + "/completion", json=dict(body, prompt=prompt), timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    got = {}
    for flags in (["--ctx-checkpoints", "4"], ["--ctx-checkpoints", "0"]):
        s = ServerProcess(path, "-np", "1", "-c", "256", *flags)
        try:
            got[flags[1]] = [ask(s, first), ask(s, second), ask(s, first)]
        finally:
            s.stop()
    s = ServerProcess(path, "-np", "1", "-c", "256")
    try:
        fresh = ask(s, second)
    finally:
        s.stop()
    with_ck, without = got["4"], got["0"]
    # the third: the second's checkpoint (28 tokens, all the first's) is the latest that fits
    assert [r["timings"]["cache_n"] for r in with_ck] == [0, len(first) - 4, len(second) - 4]
    assert [r["timings"]["cache_n"] for r in without] == [0, 0, 0]
    assert with_ck[1]["tokens"] == without[1]["tokens"] == fresh["tokens"]
    assert with_ck[2]["tokens"] == with_ck[0]["tokens"] == without[0]["tokens"]


@pytest.mark.parametrize("arch", ["mamba", "hybrid"])
def test_a_recurrent_models_prompt_cache_loads_states_back(arch, mamba_path, hybrid_path):
    """--cache-ram on a recurrent or hybrid model: the cache holds whole sequence states
    (Context.checkpoint_seq(full=True)), so a prompt that comes back starts from its cached state,
    not from scratch (a state file's check refused them).  Greedy answers stay the same."""
    path = {"mamba": mamba_path, "hybrid": hybrid_path}[arch]
    a, b = [1] + list(range(10, 40)), [1] + list(range(200, 230))
    body = {"n_predict": 6, "temperature": 0, "logit_bias": NO_EOS, "return_tokens": True}
    c = [1] + list(range(300, 330))
    # one slot: b pushes a into the cache and a comes back; two slots: c pushes a out of slot 1 into
    # the cache, and a comes back into slot 0 (pushing b out)
    plans = {1: [(a, 0), (b, 0), (a, 0)], 2: [(a, 1), (b, 0), (c, 1), (a, 0)]}
    for np_, plan in plans.items():
        s = ServerProcess(path, "-np", str(np_), "-c", str(256 * np_), "--cache-ram", "64")
        try:
            got = [httpx.post(s.url + "/completion", json=dict(body, prompt=p, id_slot=slot), timeout=60).json()
                   for p, slot in plan]
        finally:
            s.stop()
        assert got[-1]["tokens"] == got[0]["tokens"], np_
        # a's state came back from the cache, with its checkpoint 4 tokens before the prompt's end
        assert [r["timings"]["cache_n"] for r in got] == [0] * (len(plan) - 1) + [len(a) - 4], np_
