"""LoRA adapters in llama.cpp's GGUF format: loaded for a Model, applied to a Context with a
scale, removed; the logits are those of a numpy forward pass with the adapter merged in."""
import numpy as np
import pytest

import alpaca2
from alpaca2 import testing
from conftest import run_python

ALPHA = 8.0
PROMPT = [1, 5, 77, 300, 12, 9]


@pytest.fixture(scope="module")
def adapter(tiny, model_dir):
    path, w = tiny
    lora_path, pairs = testing.make_lora(model_dir / "tiny-lora.gguf", w, rank=4, alpha=ALPHA)
    return lora_path, pairs


def logits_all(ctx, tokens):
    ctx.clear()
    ctx.decode(tokens, logits="all")
    return np.array([ctx.logits_at(i) for i in range(len(tokens))])


def make_ctx(model):
    return alpaca2.Context(model, n_ctx=64, n_batch=64, n_threads=2, type_k="f32", type_v="f32", flash_attn=False)


@pytest.mark.parametrize("scale", [1.0, 0.5, -2.0])
def test_logits_follow_the_merged_reference(tiny, adapter, scale):
    path, w = tiny
    lora_path, pairs = adapter
    want = testing.reference_logits(testing.merge_lora(w, pairs, scale=scale, alpha=ALPHA), PROMPT)
    base = testing.reference_logits(w, PROMPT)
    assert np.abs(want - base).max() > 0.1                     # the adapter matters
    with alpaca2.Model(path) as m, make_ctx(m) as ctx:
        lora = alpaca2.LoraAdapter(m, lora_path)
        lora.apply(ctx, scale)
        assert lora.scale_in(ctx) == scale
        got = logits_all(ctx, PROMPT)
        np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)
        lora.remove(ctx)                                       # back to the base model
        assert lora.scale_in(ctx) is None
        np.testing.assert_allclose(logits_all(ctx, PROMPT), base, atol=2e-3, rtol=1e-3)


def test_two_adapters_add_up(tiny, adapter, model_dir):
    path, w = tiny
    lora_path, pairs = adapter
    other_path, other = testing.make_lora(model_dir / "tiny-lora2.gguf", w, rank=2, alpha=0.0, seed=9,
                                          targets=("attn_k",), output=False)
    merged = testing.merge_lora(testing.merge_lora(w, pairs, 0.5, ALPHA), other, 1.5, 0.0)
    with alpaca2.Model(path) as m, make_ctx(m) as ctx:
        alpaca2.LoraAdapter(m, lora_path).apply(ctx, 0.5)
        alpaca2.LoraAdapter(m, other_path).apply(ctx, 1.5)    # kept alive by the context
        np.testing.assert_allclose(logits_all(ctx, PROMPT), testing.reference_logits(merged, PROMPT),
                                   atol=2e-3, rtol=1e-3)


def test_llama_lora_argument(tiny, adapter):
    path, w = tiny
    lora_path, pairs = adapter
    want = testing.reference_logits(testing.merge_lora(w, pairs, 0.7, ALPHA), PROMPT)
    with alpaca2.Llama(path, n_ctx=64, n_threads=2, lora=[(lora_path, 0.7)], type_k="f32", type_v="f32",
                       flash_attn=False) as llm:
        assert [(a.path, s) for a, s in llm.lora] == [(lora_path, 0.7)]
        llm.ctx.decode(PROMPT)
        np.testing.assert_allclose(np.array(llm.ctx.logits), want[-1], atol=2e-3, rtol=1e-3)


def test_bad_adapters_are_clear_errors(tiny, tiny_path, other_path, tmp_path, model_dir):
    with alpaca2.Model(tiny_path) as m:
        with pytest.raises(alpaca2.ModelLoadError):
            alpaca2.LoraAdapter(m, tmp_path / "missing.gguf")
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(b"not a gguf at all")
        with pytest.raises(alpaca2.ModelLoadError, match="not a GGUF"):
            alpaca2.LoraAdapter(m, bad)
        with pytest.raises(alpaca2.ModelLoadError, match="LoRA"):
            alpaca2.LoraAdapter(m, other_path)                 # a model, not an adapter
        # an adapter for another architecture is refused by llama.cpp, not applied
        _, w = tiny
        qwen_path, _ = testing.make_lora(model_dir / "qwen-lora.gguf", w, arch="qwen2")
        with pytest.raises(alpaca2.ModelLoadError):
            alpaca2.LoraAdapter(m, qwen_path)


def test_lifetime_tied_to_the_model(tiny_path, adapter):
    lora_path, _ = adapter
    m = alpaca2.Model(tiny_path)
    ctx = make_ctx(m)
    lora = alpaca2.LoraAdapter(m, lora_path).apply(ctx, 1.0)
    m.close()                                                   # closes the context and the adapter
    assert lora.closed and ctx.closed
    with pytest.raises(alpaca2.ClosedError):
        lora.apply(ctx, 1.0)
    lora.close()                                                # twice is fine


def test_closing_an_adapter_takes_it_off_its_contexts(tiny, adapter):
    path, w = tiny
    lora_path, _ = adapter
    base = testing.reference_logits(w, PROMPT)
    with alpaca2.Model(path) as m, make_ctx(m) as ctx:
        lora = alpaca2.LoraAdapter(m, lora_path).apply(ctx, 1.0)
        lora.close()
        np.testing.assert_allclose(logits_all(ctx, PROMPT), base, atol=2e-3, rtol=1e-3)


def test_adapter_of_another_model_is_refused(tiny_path, other_path, adapter):
    lora_path, _ = adapter
    with alpaca2.Model(tiny_path) as m1, alpaca2.Model(other_path) as m2, make_ctx(m2) as ctx:
        lora = alpaca2.LoraAdapter(m1, lora_path)
        with pytest.raises(ValueError, match="another model"):
            lora.apply(ctx, 1.0)


def test_dropping_everything_in_any_order_does_not_crash(tiny_path, adapter):
    lora_path, _ = adapter
    code = (
        "import gc, alpaca2\n"
        f"m = alpaca2.Model({str(tiny_path)!r})\n"
        "c = alpaca2.Context(m, n_ctx=64, n_threads=1)\n"
        f"a = alpaca2.LoraAdapter(m, {lora_path!r}).apply(c, 1.0)\n"
        "c.decode([1, 2, 3])\n"
        "del m; gc.collect(); del a; gc.collect(); c.decode_token(4); del c; gc.collect()\n"
        f"m = alpaca2.Model({str(tiny_path)!r})\n"
        f"a = alpaca2.LoraAdapter(m, {lora_path!r})\n"
        "m.close(); del a\n"
        "print('ok')\n")
    r = run_python(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_cli_lora_flag(tiny, adapter, tmp_path):
    import subprocess
    import sys
    path, w = tiny
    lora_path, pairs = adapter
    with alpaca2.Llama(path, n_ctx=256, n_threads=1, template="completion", lora=(lora_path, 2.0)) as llm:
        want = llm.generate("床前明月光，", 12, temp=0)
    with alpaca2.Llama(path, n_ctx=256, n_threads=1, template="completion") as llm:
        plain = llm.generate("床前明月光，", 12, temp=0)
    assert want != plain
    r = subprocess.run([sys.executable, "-m", "alpaca2", "generate", "-m", str(path), "-c", "256", "-t", "1",
                        "-n", "12", "--temp", "0", "--lora", f"{lora_path}:2", "-p", "床前明月光，"],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == "床前明月光，" + want + "\n"
