"""Model.tokenize / detokenize / token_to_piece against sentencepiece and llama.cpp's own vectors.

The tokenizers here are SentencePiece BPE models with byte fallback, identity normalization,
add_dummy_prefix and no whitespace collapsing (like LLaMA's), so llama.cpp's SPM tokenizer must
give exactly sentencepiece's ids for every string, with no exceptions found so far (leading and
repeated spaces, tabs, newlines, "\r\n", NUL, emoji, characters only reachable by byte fallback...).
"""
import random
import re

import numpy as np
import pytest

import alpaca2
from alpaca2 import testing
from conftest import LLAMA_CPP_DIR, REAL_TOKENIZER

spm = pytest.importorskip("sentencepiece")


def make_strings():
    """At least 200 deterministic test strings: hand-picked edge cases plus seeded mixtures."""
    lines = [l for l in testing.CORPUS.splitlines() if l]
    zh_lines = [l for l in lines if any("\u4e00" <= c <= "\u9fff" for c in l)]
    clauses = [c for l in zh_lines for c in re.split(r"[，。！？；]", l) if c]
    en_words = re.findall(r"[A-Za-z]+", testing.CORPUS)
    extra_zh = ["静夜思", "李白", "杜甫", "登鹳雀楼", "大语言模型", "推理", "量化", "显存", "你好世界",
                "龘", "齉", "𠀀", "𠀁", "𪚥", "𰻞", "〇", "々"]          # rare CJK: byte fallback
    foreign = ["Привет, мир", "Здравствуйте", "مرحبا بالعالم", "السلام عليكم", "नमस्ते दुनिया",
               "हिन्दी", "こんにちは世界", "カタカナ", "안녕하세요", "Ελληνικά", "עברית", "ไทย",
               "Äpfel über Öl", "façade naïve café", "ß", "Ω≈ç√∫", "ğüşiöç"]
    emoji = ["😀", "🦙", "🚀", "👍🏽", "👨‍👩‍👧‍👦", "🇨🇳", "❤️", "✅", "🀄", "😶‍🌫️"]
    punct = ["，", "。", "！", "？", "、", "；", "：", "“", "”", "‘", "’", "（", "）", "《", "》",
             "【", "】", "……", "——", "·", ",", ".", "!", "?", ";", ":", "'", '"', "(", ")",
             "[", "]", "{", "}", "<", ">", "/", "\\", "|", "@", "#", "$", "%", "^", "&", "*",
             "-", "_", "+", "=", "~", "`"]
    ws = [" ", "  ", "   ", "\n", "\n\n", "\t", " \n", "\n ", "\t\t", "\r\n", "    "]
    digits = ["0", "7", "42", "2024", "3.14159", "1,000,000", "０１２３", "٣", "१२३", "Ⅻ", "½"]

    out = ["", " ", "  ", "   ", " " * 50, "\n", "\n\n", "\n" * 30, "\t", " \n ", "\r", "a\rb", "\r\n",
           "a", "中", "床", " 床", "  床前明月光", "床前明月光 ", "床前明月光\n", "\n床前明月光", "\t床前",
           "Hello", " Hello", "  Hello", "hello world", "Hello World!", "I'm", "don't", "3.14", "100%",
           "a  b   c    d", "line1\nline2\n\nline4", "tab\tsep\tvalues", "trailing   ", "   leading",
           "</s>", " </s>", "<s>", "[INST]", "[INST] hi [/INST]", "<unk>", "<0x0A>", "<0x41>",
           "▁", "▁▁", "▁床", "\u3000", "中\u3000文", "\u00a0", "a\u200bb", "\u200d", "\ufeffBOM",
           "e\u0301", "é", "ｆｕｌｌ　ｗｉｄｔｈ", "\x00", "a\x00b", "\x01\x02", "\x7f", "\x0b\x0c",
           "\u2028", "\U0010FFFF", "\ufffd", "a" * 300, "床" * 200]
    out += zh_lines + clauses + foreign + emoji + [l for l in lines if l not in zh_lines]
    rng = random.Random(1234)
    pools = [clauses, en_words, extra_zh, foreign, emoji, punct, ws, digits]
    weights = [6, 5, 2, 1, 1, 3, 2, 2]
    while len(out) < 330:
        parts = [rng.choice(rng.choices(pools, weights)[0]) for _ in range(rng.randint(1, 8))]
        out.append(rng.choice(["", "", "", " "]).join(parts))
    return list(dict.fromkeys(out))     # dedupe, keep order


STRINGS = make_strings()

# SentencePiece escapes every space as "▁" (U+2581) before tokenizing, so a literal "▁" in the
# input is indistinguishable from a space and comes back as " " (sentencepiece's own decode does
# the same): the only strings that cannot round-trip.  They still must tokenize identically.
ROUNDTRIP = [s for s in STRINGS if "\u2581" not in s]


def test_enough_strings():
    assert len(STRINGS) >= 200
    assert len(ROUNDTRIP) >= 200


def _mismatches(model, sp, strings):
    bad = []
    for s in strings:
        got, want = model.tokenize(s, add_bos=False), sp.encode(s)
        if got != want:
            bad.append((s, got, want))
    return bad


def _check_against_sentencepiece(model, sp):
    assert model.vocab_type == "spm"
    assert model.n_vocab == sp.get_piece_size()
    assert (model.bos, model.eos) == (sp.bos_id(), sp.eos_id())
    bad = _mismatches(model, sp, STRINGS)
    assert not bad, f"{len(bad)} of {len(STRINGS)} strings differ from sentencepiece, e.g. {bad[:3]}"
    for s in STRINGS[:60]:
        assert model.tokenize(s) == [model.bos] + sp.encode(s)          # add_bos=True
    assert model.tokenize("") == [model.bos]
    assert model.tokenize("", add_bos=False) == []


def _check_roundtrip_no_bos(model, sp):
    bad = []
    for s in ROUNDTRIP:
        toks = model.tokenize(s, add_bos=False)
        # without BOS llama.cpp strips the dummy-prefix space of the first piece by itself
        if model.detokenize(toks) != s or sp.decode(toks) != s:
            bad.append((s, model.detokenize(toks)))
    assert not bad, f"{len(bad)} strings do not round-trip: {bad[:5]}"
    for s in STRINGS:
        if "\u2581" in s:
            assert sp.decode(sp.encode(s)) == s.replace("\u2581", " ")
            assert model.detokenize(model.tokenize(s, add_bos=False)) == s.replace("\u2581", " ")


def _check_roundtrip_with_bos(model):
    bad = [(s, model.detokenize(model.tokenize(s))) for s in ROUNDTRIP
           if model.detokenize(model.tokenize(s)) != s]
    assert not bad, (f"{len(bad)} strings do not round-trip with BOS (a leading ' ' means the BOS "
                     f"was not dropped before llama_detokenize): {bad[:5]}")


@pytest.fixture(scope="module")
def sp(tokenizer_path):
    return spm.SentencePieceProcessor(model_file=str(tokenizer_path))


# ------------------------------------------------------------------------------------------------
# the trained 800-piece vocabulary

def test_tokenize_matches_sentencepiece(model, sp):
    _check_against_sentencepiece(model, sp)


def test_vocab_only_model_tokenizes_the_same(tiny_path, model, sp):
    with alpaca2.Model(tiny_path, vocab_only=True) as vo:
        for s in STRINGS[::5]:
            assert vo.tokenize(s) == model.tokenize(s)


def test_detokenize_roundtrip_without_bos(model, sp):
    _check_roundtrip_no_bos(model, sp)


def test_detokenize_roundtrip_with_bos(model):
    _check_roundtrip_with_bos(model)


def test_tokenize_accepts_utf8_bytes(model):
    for s in STRINGS[::7]:
        assert model.tokenize(s.encode("utf-8")) == model.tokenize(s)
    # invalid UTF-8 goes through byte fallback and comes back byte for byte
    for raw in (b"\xff\xfe", b"a\xe5\xba", b"\xed\xa0\x80", "床前".encode()[:-1]):
        toks = model.tokenize(raw, add_bos=False)
        assert model.detokenize_bytes(toks) == raw
        assert model.detokenize(toks) == raw.decode("utf-8", "replace")


# ------------------------------------------------------------------------------------------------
# the real Chinese-LLaMA-2 tokenizer (55,296 pieces)

@pytest.fixture(scope="module")
def real(tmp_path_factory):
    if not REAL_TOKENIZER.exists():
        pytest.skip(f"no Chinese-LLaMA-2 tokenizer at {REAL_TOKENIZER}")
    path = testing.make_model(tmp_path_factory.mktemp("real_vocab") / "real-vocab.gguf",
                              tokenizer=str(REAL_TOKENIZER),
                              shape={"n_embd": 64, "n_layer": 1, "n_head": 4, "n_head_kv": 4, "n_ff": 128})
    m = alpaca2.Model(path, vocab_only=True)
    yield m, spm.SentencePieceProcessor(model_file=str(REAL_TOKENIZER))
    m.close()


def test_real_tokenizer_matches_sentencepiece(real):
    m, rsp = real
    assert m.n_vocab == 55296
    _check_against_sentencepiece(m, rsp)
    # the merged Chinese vocabulary really is in use: whole words, not bytes
    assert len(m.tokenize("人工智能正在改变我们的生活", add_bos=False)) < 10


def test_real_tokenizer_roundtrip(real):
    m, rsp = real
    _check_roundtrip_no_bos(m, rsp)


def test_real_tokenizer_roundtrip_with_bos(real):
    _check_roundtrip_with_bos(real[0])


# ------------------------------------------------------------------------------------------------
# llama.cpp's own test vectors (as tests/test-tokenizer-0.cpp reads them)

LLAMA_SPM_VOCAB = LLAMA_CPP_DIR / "models" / "ggml-vocab-llama-spm.gguf"


def _read_vocab_tests(path):
    """Pairs (text bytes, expected ids) like test-tokenizer-0.cpp: cases in .inp are separated by
    "\\n__ggml_vocab_test__\\n" (the file ends with one); .out has one stripped line of ids per case."""
    raw = path.with_name(path.name + ".inp").read_bytes()
    sep = b"\n__ggml_vocab_test__\n"
    inputs, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(sep, pos)
        if nxt < 0:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(sep)
    lines = path.with_name(path.name + ".out").read_bytes().decode().split("\n")
    if lines and lines[-1] == "":
        lines.pop()                          # std::getline: no empty case after the final newline
    assert len(inputs) == len(lines)
    return [(inp, [int(t) for t in line.split()]) for inp, line in zip(inputs, lines)]


@pytest.mark.skipif(not LLAMA_SPM_VOCAB.exists(), reason="llama.cpp's vocab test files are not vendored")
def test_llama_cpp_vocab_vectors():
    cases = _read_vocab_tests(LLAMA_SPM_VOCAB)
    assert len(cases) >= 40
    assert any(ids == [] for _, ids in cases)           # the empty string is one of them
    with alpaca2.Model(LLAMA_SPM_VOCAB, vocab_only=True) as m:
        assert m.vocab_type == "spm" and m.n_vocab == 32000
        failed = []
        for text, want in cases:
            # test-tokenizer-0.cpp: common_tokenize(ctx, text, add_special=false, parse_special=false)
            got = m.tokenize(text, add_bos=False, special=False)
            if got != want:
                failed.append((text.decode("utf-8", "replace"), got, want))
            else:
                assert m.detokenize_bytes(got) == text
        assert not failed, f"{len(failed)} of {len(cases)} llama.cpp vectors differ: {failed[:3]}"
        # and with BOS, as the model asks for
        for text, want in cases:
            assert m.tokenize(text) == [m.bos] + want


# ------------------------------------------------------------------------------------------------
# special tokens

CHAT = "</s><s>[INST]"


def test_special_false_keeps_control_text(model, sp):
    toks = model.tokenize(CHAT, add_bos=False)
    assert model.bos not in toks and model.eos not in toks
    assert toks == sp.encode(CHAT)              # sentencepiece never parses control pieces either
    with_bos = model.tokenize(CHAT)
    assert with_bos[0] == model.bos and with_bos[1:] == toks
    assert model.detokenize(toks) == CHAT
    assert model.detokenize_bytes(toks) == CHAT.encode()


def test_special_true_parses_control_tokens(model, sp):
    assert model.tokenize("</s>", add_bos=False, special=True) == [model.eos]
    assert model.tokenize("<s>", add_bos=False, special=True) == [model.bos]
    toks = model.tokenize(CHAT, add_bos=False, special=True)
    assert toks[:2] == [model.eos, model.bos]
    # llama.cpp puts the SPM dummy-prefix space in front of text that follows a special token
    # (HF "legacy" Llama behaviour), so "[INST]" is encoded as sentencepiece encodes it alone
    assert toks[2:] == sp.encode("[INST]")
    assert model.tokenize("hello</s>", add_bos=False, special=True) == sp.encode("hello") + [model.eos]
    # control tokens vanish from text unless rendered with special=True
    assert model.detokenize(toks) == " [INST]"
    assert model.detokenize(toks, special=True) == "</s><s> [INST]"


def test_token_properties(model):
    assert model.bos == 1 and model.eos == 2
    assert model.token_is_eog(model.eos) and not model.token_is_eog(model.bos)
    assert model.token_is_control(model.bos) and model.token_is_control(model.eos)
    assert model.token_to_piece(model.bos) == b""
    assert model.token_to_piece(model.bos, special=True) == b"<s>"
    assert model.token_to_piece(model.eos, special=True) == b"</s>"


# ------------------------------------------------------------------------------------------------
# token_to_piece

def _check_byte_tokens(m):
    byte_tokens = {}
    for t in range(m.n_vocab):
        text = m.token_text(t)
        if re.fullmatch(r"<0x[0-9A-F]{2}>", text):
            byte_tokens[int(text[3:5], 16)] = t
    assert sorted(byte_tokens) == list(range(256))
    for b, t in byte_tokens.items():
        assert m.token_to_piece(t) == bytes([b])
    return byte_tokens


def test_token_to_piece_byte_fallback(model, sp):
    byte_tokens = _check_byte_tokens(model)
    # "𠀀" (U+20000) is not in the corpus: four byte tokens F0 A0 80 80, after a lone "▁"
    toks = model.tokenize("𠀀", add_bos=False)
    assert toks == sp.encode("𠀀")
    assert toks[-4:] == [byte_tokens[b] for b in "𠀀".encode()]
    assert [model.token_to_piece(t) for t in toks[-4:]] == [b"\xf0", b"\xa0", b"\x80", b"\x80"]


@pytest.mark.parametrize("text", ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。𠀀", "中文大语言模型\n很重要！",
                                  "我爱Python和C++。", "龘齉𪚥"])
def test_token_to_piece_concatenation(model, text):
    toks = model.tokenize(text)
    assert toks[0] == model.bos
    pieces = [model.token_to_piece(t) for t in toks[1:]]
    # the first piece carries SPM's dummy-prefix space ("▁床前" -> b" 床前"); the rest is exact UTF-8
    assert b"".join(pieces) == b" " + text.encode("utf-8")
    assert pieces[0].startswith(b" ")
    assert model.detokenize_bytes(toks[1:]) == text.encode("utf-8")


def test_real_token_to_piece(real):
    m, _ = real
    _check_byte_tokens(m)
    text = "人工智能正在改变我们的生活和工作方式，𠀀"
    toks = m.tokenize(text)
    assert b"".join(m.token_to_piece(t) for t in toks[1:]) == b" " + text.encode()


# ------------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("bad", [123, None, 1.5, ["a"], np.int32(3)])
def test_tokenize_rejects_non_text(model, bad):
    with pytest.raises(TypeError):
        model.tokenize(bad)


@pytest.mark.parametrize("bad", [[-1], "n_vocab", [0, 5, 10**12], [5, -2147483648]])
def test_detokenize_rejects_out_of_range_ids(model, bad):
    if bad == "n_vocab":
        bad = [model.n_vocab]
    with pytest.raises(alpaca2.TokenizeError) as info:
        model.detokenize(bad)
    assert isinstance(info.value, ValueError)
    with pytest.raises(alpaca2.TokenizeError):
        model.detokenize_bytes(bad)


@pytest.mark.parametrize("bad", [5, "abc", [[1, 2]], [1.5, None]])
def test_detokenize_rejects_non_token_lists(model, bad):
    with pytest.raises(TypeError):
        model.detokenize(bad)


def test_token_to_piece_out_of_range(model):
    for t in (-1, model.n_vocab):
        with pytest.raises(alpaca2.TokenizeError):
            model.token_to_piece(t)


def test_detokenize_empty(model):
    assert model.detokenize([]) == ""
    assert model.detokenize([model.bos]) == ""
    assert model.detokenize(np.array([], dtype=np.int32)) == ""
