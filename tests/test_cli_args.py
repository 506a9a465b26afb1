"""The command's flags: a bad value is one line on stderr and exit code 2 (checked when parsed,
before a model is loaded), never a traceback; good values reach the Context and the sampler."""
import json
import os
import subprocess
import sys

import pytest

import alpaca2
from alpaca2.cli import build_parser

CMD = [sys.executable, "-m", "alpaca2"]
ENV = dict(os.environ, LANG="C.UTF-8", LC_ALL="C.UTF-8", PYTHONIOENCODING="utf-8", HF_HUB_OFFLINE="1")


def run(args, timeout=120, **kw):
    return subprocess.run(CMD + list(args), capture_output=True, timeout=timeout, env=ENV,
                          stdin=subprocess.DEVNULL, **kw)


def assert_usage_error(r, *words):
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2, (r.returncode, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert r.stdout == b""


BAD = [
    (["chat", "--top-k", "99999999999"], "--top-k"),
    (["chat", "--top-k", "-1"], "--top-k"),
    (["chat", "--temp", "nan"], "--temp"),
    (["chat", "--temp", "inf"], "--temp"),
    (["chat", "--top-p", "5"], "--top-p"),
    (["chat", "--top-p", "0"], "--top-p"),
    (["chat", "--min-p", "-0.1"], "--min-p"),
    (["chat", "--repeat-penalty", "0"], "--repeat-penalty"),
    (["chat", "--repeat-penalty", "abc"], "--repeat-penalty"),
    (["chat", "--repeat-last-n", "-2"], "--repeat-last-n"),
    (["chat", "-n", "-5"], "-n"),
    (["chat", "-c", "-1"], "-c"),
    (["chat", "-c", "99999999999"], "-c"),
    (["chat", "-t", "0"], "-t"),
    (["chat", "-b", "0"], "-b"),
    (["chat", "-ub", "0"], "-ub"),
    (["chat", "-fa", "maybe"], "-fa"),
    (["chat", "-ctk", "q9"], "-ctk"),
    (["chat", "--seed", "-5"], "--seed"),
    (["chat", "--seed", str(2**32)], "--seed"),
    (["chat", "--rope-freq-scale", "0"], "--rope-freq-scale"),
    (["chat", "--rope-freq-base", "-1"], "--rope-freq-base"),
    (["chat", "--rope-scaling", "ntk"], "--rope-scaling"),
    (["chat", "--yarn-orig-ctx", "-1"], "--yarn-orig-ctx"),
    (["chat", "--lora", "x.gguf:nan"], "--lora"),
    (["chat", "--n-draft", "0"], "--n-draft"),
    (["chat", "--draft-p-min", "2"], "--draft-p-min"),
    (["generate", "--top-k", "99999999999"], "--top-k"),
    (["generate", "-ngl", "-2"], "-ngl"),
    (["bench", "-r", "0"], "-r"),
    (["bench", "-p", "a,b"], "-p"),
    (["bench", "-n", "-1"], "-n"),
    (["bench", "-t", "0"], "-t"),
    (["rpc-server", "-t", "-2"], "-t"),
    (["rpc-server", "-p", "70000"], "-p"),
    (["rpc-server", "-p", "0"], "-p"),
]


@pytest.mark.parametrize("argv,flag", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_are_one_line_and_exit_2_in_process(argv, flag, capsys):
    """Every bad value, checked by the parser itself (fast: no subprocess per case)."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv + ["-m", "model.gguf"] if argv[0] not in ("rpc-server",) else argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and flag in lines[0], err


@pytest.mark.parametrize("argv", [["chat", "-m", "x.gguf", "--top-k", "99999999999"],
                                  ["rpc-server", "-t", "-2"], ["bench", "-m", "x.gguf", "-r", "0"],
                                  ["chat", "-m", "x.gguf", "--temp", "nan"]])
def test_bad_values_through_the_command(argv):
    """The same through the real command: one line, exit code 2, nothing on stdout."""
    assert_usage_error(run(argv), argv[-2])


def test_good_values_parse():
    a = build_parser().parse_args(
        ["chat", "-m", "x.gguf", "--top-k", "0", "--temp", "-1", "--top-p", "1", "-n", "-1", "-c", "0", "-t", "-1",
         "-b", "64", "-ub", "32", "-fa", "off", "-ctk", "q8_0", "-ctv", "q8_0", "--seed", "-1",
         "--rope-scaling", "yarn", "--rope-freq-base", "20000", "--rope-freq-scale", "0.25",
         "--yarn-orig-ctx", "4096", "--lora", "a.gguf", "--lora", "b.gguf:0.5", "-r", "User:", "-r", "Q:",
         "--no-mmap", "--mlock", "--repeat-last-n", "-1"])
    assert (a.top_k, a.temp, a.top_p, a.n_predict, a.ctx_size, a.threads) == (0, -1.0, 1.0, -1, 0, -1)
    assert (a.batch_size, a.ubatch_size, a.flash_attn, a.cache_type_k, a.cache_type_v) == (64, 32, False, "q8_0", "q8_0")
    assert a.lora == [("a.gguf", 1.0), ("b.gguf", 0.5)]
    assert a.reverse_prompt == ["User:", "Q:"]
    assert a.use_mmap is False and a.mlock is True
    from alpaca2.cli import args as A
    kw = A.context_kwargs(a)
    assert kw["rope_scaling"] == "yarn" and kw["rope_freq_base"] == 20000 and kw["rope_freq_scale"] == 0.25
    assert kw["yarn_orig_ctx"] == 4096 and kw["n_ubatch"] == 32 and kw["flash_attn"] is False
    assert A.sampling(a, 512)["penalty_last_n"] == 512 and A.seed(a) is None and A.threads(a) is None


def test_grammar_flags_are_exclusive(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["chat", "-m", "x.gguf", "--grammar", "root ::= \"a\"", "--grammar-file", "g"])
    assert e.value.code == 2


# -- the flags at work -------------------------------------------------------------------------

def test_non_utf8_prompt_bytes_reach_the_tokenizer_unchanged(tiny_path, tmp_path):
    """Bytes that are not UTF-8 in an argument are tokenized as they are (as llama.cpp does)."""
    raw = b"abc \xff\xfe \xe4\xbd"                    # invalid UTF-8, and a cut character
    arg = os.fsdecode(raw)                             # what Python's argv holds for those bytes
    r = subprocess.run(CMD + ["tokenize", "-m", str(tiny_path), "--ids", arg], capture_output=True, env=ENV,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    with alpaca2.Model(tiny_path, vocab_only=True) as m:
        assert got == m.tokenize(raw)
        assert got != m.tokenize(arg)                  # what the old command did (other bytes)
    r = subprocess.run(CMD + ["generate", "-m", str(tiny_path), "-n", "2", "--temp", "0", "-t", "1", "-p", arg],
                       capture_output=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(raw)                    # the prompt is echoed as its bytes


def test_prompt_file_and_reverse_prompt(tiny_path, tmp_path):
    with alpaca2.Llama(str(tiny_path), n_ctx=512, n_threads=1, template="completion") as llm:
        full = llm.generate("床前明月光，", 24, temp=0)
        stop = full[4:6]
        cut = llm.generate("床前明月光，", 24, temp=0, stop=[stop])
    assert stop and cut == full[:full.index(stop)]
    f = tmp_path / "prompt.txt"
    f.write_bytes("床前明月光，".encode() + b"\n")             # one trailing newline is dropped, as llama.cpp's -f
    base = ["generate", "-m", str(tiny_path), "-n", "24", "--temp", "0", "-t", "1", "-c", "512", "-f", str(f)]
    r = run(base)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == "床前明月光，" + full + "\n"
    r = run(base + ["-r", stop])
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == "床前明月光，" + cut + "\n"


def test_grammar_file_constrains_generate(tiny_path, tmp_path):
    g = tmp_path / "digits.gbnf"
    g.write_text('root ::= [0-9] [0-9] [0-9] "!"\n')
    r = run(["generate", "-m", str(tiny_path), "-n", "16", "--temp", "0.8", "-s", "3", "-t", "1", "-c", "256",
             "--grammar-file", str(g), "-p", "x"])
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()[1:].rstrip("\n")
    assert len(out) == 4 and out[:3].isdigit() and out[3] == "!", out
    r = run(["generate", "-m", str(tiny_path), "-n", "4", "-t", "1", "--grammar", "root ::= (", "-p", "x"])
    assert r.returncode == 1 and b"Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


def test_info_shows_the_context_options(tiny_path):
    r = run(["info", "-m", str(tiny_path), "-c", "256", "--rope-scaling", "linear", "--rope-freq-scale", "0.5",
             "--rope-freq-base", "20000", "-ctk", "f32", "-t", "1"])
    assert r.returncode == 0, r.stderr
    ctx = json.loads(r.stdout)["context"]
    assert ctx["rope_scaling"] == "linear" and ctx["rope_freq_scale"] == 0.5 and ctx["rope_freq_base"] == 20000
    assert ctx["type_k"] == "f32" and ctx["n_ctx"] == 256 and ctx["n_threads"] == 1


def test_rope_options_reach_the_context(tiny_path):
    """Linear RoPE scaling changes the logits past position 0 (the freq scale reaches the graph)."""
    import numpy as np
    ids = None
    out = {}
    for scale in (None, 0.5):
        kw = {} if scale is None else dict(rope_scaling="linear", rope_freq_scale=scale)
        with alpaca2.Llama(str(tiny_path), n_ctx=128, n_threads=1, type_k="f32", type_v="f32", **kw) as llm:
            ids = llm.tokenize("床前明月光，疑是地上霜。")
            llm.ctx.decode(ids)
            out[scale] = np.array(llm.ctx.logits)
    assert not np.allclose(out[None], out[0.5], atol=1e-4)


def test_load_and_context_flags_reach_llama(tiny_path):
    """-b/-ub, --no-mmap, --mlock, -fa, -ctk/-ctv: the command answers what the API answers with
    the same settings (greedy on an F32 model: token for token)."""
    def api(**kw):
        with alpaca2.Llama(str(tiny_path), n_ctx=256, n_threads=1, template="completion", **kw) as llm:
            return llm.generate("床前明月光，", 12, temp=0)

    def cli(*flags):
        r = run(["generate", "-m", str(tiny_path), "-c", "256", "-t", "1", "-n", "12", "--temp", "0",
                 "-p", "床前明月光，", *flags])
        assert r.returncode == 0, r.stderr
        return r.stdout.decode()[len("床前明月光，"):-1]

    assert cli("-b", "4", "-ub", "2", "--no-mmap", "--mlock") == api(n_batch=4, n_ubatch=2)
    assert cli("-fa", "off", "-ctk", "f32", "-ctv", "f32") == api(flash_attn=False, type_k="f32", type_v="f32")
    assert cli("-fa", "on", "-ctk", "bf16", "-ctv", "f16") == api(flash_attn=True, type_k="bf16", type_v="f16")


def test_piped_chat_line_that_is_not_utf8(tiny_path):
    """A line of piped input that is not UTF-8 gets an empty answer and one line on stderr."""
    r = subprocess.run(
        CMD + ["chat", "-m", str(tiny_path), "--template", "alpaca2", "--temp", "0", "-n", "4", "-t", "1"],
        input=b"\xff\xfe\n" + "你好\n".encode(), capture_output=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split(b"\n")
    assert lines[0] == b"" and len(lines) == 3 and lines[2] == b""
    assert b"input line 1 is not UTF-8" in r.stderr and b"Traceback" not in r.stderr


def test_json_schema_constrains_generate(tiny_path):
    """--json-schema goes through llama.cpp's converter (alpaca2._common, issue 16b) to a grammar."""
    pytest.importorskip("alpaca2._common", reason="alpaca2._common (llama.cpp's common library) not built")
    r = run(["generate", "-m", str(tiny_path), "-n", "24", "--temp", "0.8", "-s", "3", "-t", "1", "-c", "256",
             "--json-schema", '{"type": "integer"}', "-p", "x"])
    assert r.returncode == 0, r.stderr
    int(r.stdout.decode()[1:].strip())                 # the continuation is a JSON integer
    r = run(["generate", "-m", str(tiny_path), "-t", "1", "--json-schema", "{not json", "-p", "x"])
    assert r.returncode == 1 and b"Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
