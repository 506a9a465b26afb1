"""alpaca2._grammar_check: grammars llama.cpp cannot build safely are refused before it sees them.

Each hostile shape is shown twice: check_grammar() refuses it, and llama.cpp itself, given it in a
fresh interpreter, crashes (a signal) or runs past a bound.  Every grammar of llama.cpp's own
JSON-schema converter tests and grammars/ directory passes, and the check is linear in the length.
"""
import glob
import math
import os
import re
import subprocess
import sys
import time

import pytest

import alpaca2
from alpaca2 import _grammar_check
from alpaca2._grammar_check import check_grammar
from alpaca2.errors import GrammarError

from conftest import LLAMA_CPP_DIR

# -- hostile shapes ------------------------------------------------------------------------------


def nested(n):
    return "root ::= " + "(" * n + '"x"' + ")" * n + "\n"


def chained(n):
    return "root ::= r0\n" + "".join(f"r{i} ::= r{i + 1}\n" for i in range(n)) + f'r{n} ::= "x"\n'


def chained_stack(n):
    # every rule starts with the next and goes on: llama.cpp's initial stack is n deep
    return "root ::= r0\n" + "".join(f'r{i} ::= r{i + 1} "y"\n' for i in range(n)) + f'r{n} ::= "x"\n'


def shared(n):
    # each rule's two alternatives start with the same next rule: llama.cpp's left-recursion
    # check walks it 2**n times
    return "root ::= a0\n" + "".join(f'a{i} ::= a{i + 1} "p" | a{i + 1} "q"\n' for i in range(n)) + f'a{n} ::= "x"\n'


def alternation(n):
    return "root ::= " + " | ".join(f'"w{i}"' for i in range(n)) + "\n"


LLAMA = r"""
import sys, time, alpaca2, alpaca2._grammar_check
alpaca2._grammar_check.check_grammar = lambda *a, **k: {}    # the core calls it before llama.cpp parses
m = alpaca2.Model(sys.argv[1])
text = open(sys.argv[2]).read()
t = time.perf_counter()
try:
    alpaca2.Sampler(temp=0, grammar=text, model=m)
    print("BUILT", time.perf_counter() - t)
except alpaca2.GrammarError as e:
    print("GrammarError", time.perf_counter() - t)
"""


def build_in_llama_cpp(model_path, text, tmp_path, timeout=60):
    """Build the grammar with llama.cpp alone (no pre-check) in a fresh interpreter."""
    path = tmp_path / "g.gbnf"
    path.write_text(text)
    env = dict(os.environ, GGML_NO_BACKTRACE="1")
    return subprocess.run([sys.executable, "-c", LLAMA, str(model_path), str(path)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_nesting_20000_deep_is_refused_and_segfaults_llama_cpp(tiny_path, tmp_path):
    text = nested(20000)
    with pytest.raises(GrammarError, match="nested 20000 deep"):
        check_grammar(text)
    r = build_in_llama_cpp(tiny_path, text, tmp_path)
    assert r.returncode < 0, (r.returncode, r.stdout)            # SIGSEGV: the C stack ran out


def test_100000_chained_rules_are_refused_and_segfault_llama_cpp(tiny_path, tmp_path):
    text = chained(100_000)
    with pytest.raises(GrammarError, match="chain of 100002 rules"):
        check_grammar(text)
    r = build_in_llama_cpp(tiny_path, text, tmp_path)
    assert r.returncode < 0, (r.returncode, r.stdout)


def test_shared_alternatives_are_refused_before_llama_cpp_takes_exponential_time():
    # llama.cpp's left-recursion check re-walks shared rules: 2**(n+1) calls for shared(n); at
    # 40 levels it runs for hours (measured: 14 levels 8.5 s, 16 past 30 s)
    with pytest.raises(GrammarError, match="over and over"):
        check_grammar(shared(40))
    assert check_grammar(shared(12))["left_visits"] == 2 ** 13


def test_alternatives_deep_in_a_chain_are_refused():
    # 2048 stacks, each 500 deep, compared pairwise from the bottom: measured 4.5 s in llama.cpp
    text = ("root ::= c0\n" + "".join(f'c{i} ::= c{i + 1} "y"\n' for i in range(500)) + "c500 ::= a0\n"
            + "".join(f'a{i} ::= a{i + 1} "p" | a{i + 1} "q"\n' for i in range(11)) + 'a11 ::= "x"\n')
    with pytest.raises(GrammarError, match="2048 stacks"):
        check_grammar(text)


def test_repetition_with_max_below_min_is_refused():
    # llama.cpp computes max - min unsigned: ~2**64 generated rules, memory without bound
    with pytest.raises(GrammarError, match="maximum below its minimum"):
        check_grammar('root ::= "x"{5,2}\n')


def test_long_literal_under_a_large_repetition_is_refused():
    with pytest.raises(GrammarError, match="expands to more than"):
        check_grammar('root ::= "' + "a" * 10_000 + '"{2000}\n')


def test_huge_alternation_is_refused():
    most = math.isqrt(_grammar_check.MAX_STACK_WORK)          # stacks**2 within the budget
    with pytest.raises(GrammarError, match=f"{most + 1} stacks"):
        check_grammar(alternation(most + 1))
    assert check_grammar(alternation(most))["stacks"] == most


@pytest.mark.parametrize("text,message", [
    ("root ::= foo\n", "undefined rule 'foo'"),
    ("root ::= a\na ::= a \"x\"\n", "left recursion"),
    ("root ::= \"x\"\n", None),
    ("other ::= \"x\"\n", "no 'root' rule"),
    ("root ::= \"x\" <[5000]>\n", "outside the vocabulary"),
    ("root ::= \"\\q\"\n", "unknown escape"),
    ("root ::= (\"x\"\n", "expecting ')'"),
    ("root ::= \"x\"{3000}\n", "over llama.cpp's limit"),
    ("root ::= \"x\0\"\n", "NUL"),
])
def test_syntax_errors_and_limits(text, message):
    if message is None:
        assert check_grammar(text, n_vocab=800)["n_rules"] == 1
    else:
        with pytest.raises(GrammarError, match=re.escape(message)):
            check_grammar(text, n_vocab=800)


def test_what_llama_cpp_refuses_the_check_refuses(model):
    # the same verdict as llama.cpp's parser on small invalid grammars
    for text in ["root ::= foo\n", "root ::= (\"x\"\n", "root ::= \"x\"{3000}\n", "root ::= a\na ::= a \"x\"\n",
                 "root ::= \"\\q\"\n", "root ::= [a-\n", "root ::= x\n"]:
        with pytest.raises(GrammarError):
            check_grammar(text)
        with pytest.raises(GrammarError):
            alpaca2.Sampler(temp=0, grammar=text, model=model)


# -- what must still pass ------------------------------------------------------------------------

def schema_grammars():
    """The expected grammars of llama.cpp's JSON-schema converter tests (realistic schemas)."""
    src = (LLAMA_CPP_DIR / "tests" / "test-json-schema-to-grammar.cpp").read_text()
    found = re.findall(r'test\(\{\s*SUCCESS,\s*"([^"]*)",\s*R"""\((.*?)\)""",\s*R"""\((.*?)\)"""', src, re.S)
    return [(name, re.sub(r"(^|\n)[ \t]+", r"\1", gram.strip())) for name, _, gram in found if gram.strip()]


def test_every_json_schema_grammar_of_llama_cpp_passes(model):
    grammars = schema_grammars()
    assert len(grammars) > 50
    for name, text in grammars:
        info = check_grammar(text, n_vocab=model.n_vocab)
        assert info["n_rules"] >= 1, name
    # and llama.cpp builds them (a sample: each build is quick)
    for name, text in grammars[::8]:
        alpaca2.Sampler(temp=0, grammar=text, model=model).close()


def test_every_gbnf_file_of_llama_cpp_passes(model):
    files = sorted(glob.glob(str(LLAMA_CPP_DIR / "grammars" / "*.gbnf")))
    assert len(files) >= 5
    for f in files:
        text = open(f, encoding="utf-8").read()
        check_grammar(text)
        alpaca2.Sampler(temp=0, grammar=text, model=model).close()


def test_grammars_at_the_limits_build_in_llama_cpp(tiny_path, tmp_path):
    # at each limit llama.cpp builds the grammar (the bound on its time is in benchmarks, not here)
    for text in [nested(_grammar_check.MAX_NESTING), chained(_grammar_check.MAX_LEFT_CHAIN - 2),
                 chained_stack(_grammar_check.MAX_LEFT_CHAIN - 2), shared(12),
                 alternation(math.isqrt(_grammar_check.MAX_STACK_WORK))]:
        check_grammar(text)
        r = build_in_llama_cpp(tiny_path, text, tmp_path)
        assert r.returncode == 0 and r.stdout.startswith("BUILT"), (r.returncode, r.stdout, r.stderr[-500:])


def test_the_check_is_linear_in_the_grammar_length():
    # counted work, not time: the elements and rules built grow with the text, never its square
    small = check_grammar(chained_stack(500))
    big = check_grammar(chained_stack(1000))
    assert big["n_elements"] <= 2.1 * small["n_elements"]
    json_like = "\n".join(f'r{i} ::= "{{" space "k{i}" space ":" space [0-9]+ "}}"' for i in range(5000))
    info = check_grammar("root ::= r0\nspace ::= \" \"?\n" + json_like)
    assert info["n_rules"] < 3 * 5000
