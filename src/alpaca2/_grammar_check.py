"""A pre-check of GBNF grammars before llama.cpp builds them (issue 14).

llama.cpp's grammar parser and the checks that follow it (src/llama-grammar.cpp) are recursive and
trust the grammar's shape: parentheses nested 20,000 deep, or 100,000 rules each starting with the
next, overflow the C stack (a segfault); rules whose alternatives share a successor make the
left-recursion check exponential; a big alternation makes the initial stacks quadratic; an
`x{5,2}` repetition loops forever, and a long literal under `{2000}` fills memory.  check_grammar()
reads the grammar once, as llama.cpp's parser does, in time linear in its length, builds the same
rules (sizes only, never more than MAX_ELEMENTS elements), and raises GrammarError when any of
these measures is over a limit chosen so that llama.cpp builds any accepted grammar in well under a
second and far from the stack's end (tests/test_grammar_check.py measures both).
"""
from __future__ import annotations

import re

from alpaca2.errors import GrammarError

# Limits (see tests/test_grammar_check.py for what llama.cpp costs at and beyond each one)
MAX_NESTING = 256             # parentheses inside parentheses: the parser's recursion
MAX_LEFT_CHAIN = 2000         # rules reached through leftmost references: the left-recursion check's recursion
MAX_LEFT_VISITS = 200_000     # calls of the left-recursion check (it does not remember visited rules)
MAX_STACKS = 4096             # stacks a rule can expand to before its first character (quadratic)
MAX_ELEMENTS = 2_000_000      # grammar elements after repetitions are expanded (memory, build time)
MAX_RULES = 200_000
MAX_REPETITION = 2000         # llama.cpp's MAX_REPETITION_THRESHOLD

# element kinds (llama_gretype, reduced to what the checks need)
_CHAR, _REF, _TOKEN = 0, 1, 2

_WORD = re.compile(r"[a-zA-Z0-9-]+")
_INT = re.compile(r"[0-9]+")
_SPACE_NL = re.compile(r"(?:[ \t\r\n]+|#[^\r\n]*)*")
_SPACE = re.compile(r"(?:[ \t]+|#[^\r\n]*)*")
_LITERAL = re.compile(r'"((?:[^"\\]|\\.)*)"', re.S)
_CLASS = re.compile(r'\[\^?((?:[^\]\\]|\\.)*)\]', re.S)
# escapes left to right: a known one, or (group 1) what llama.cpp's parse_char refuses
_ESCAPES = re.compile(r'\\(?:[trn\\"\[\]-]|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})|(\\.?)', re.S)
# what can hold a parenthesis that is not one: literals, character classes, tokens, comments
_PAREN_SCAN = re.compile(r'"(?:\\.|[^"\\])*"?|\[(?:\\.|[^\]\\])*\]?|<[^>]*>?|#[^\r\n]*|[()]')


def _nesting(text):
    """The deepest nesting of parentheses, by one linear scan (before the recursive parse)."""
    depth = deepest = 0
    for m in _PAREN_SCAN.finditer(text):
        c = m.group()
        if c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth = max(depth - 1, 0)
    return deepest


def _weight(seq):
    """llama.cpp's element count of a sequence (a literal or class entry weighs its length)."""
    return sum(value if kind == _CHAR else 1 for kind, value in seq)


class _Parser:
    """A mirror of llama_grammar_parser: the same rules (as lists of alternatives of elements),
    the same generated rules for groups and repetitions, and the same errors where it matters."""

    def __init__(self, text, n_vocab):
        self.src = text
        self.n = len(text)
        self.n_vocab = n_vocab
        self.symbols = {}            # name -> rule id
        self.rules = {}              # rule id -> list of alternatives (lists of (kind, value))
        self.n_elements = 0
        self.depth = 0

    def fail(self, message, pos=None):
        where = "" if pos is None else f" at line {self.src.count(chr(10), 0, pos) + 1}"
        raise GrammarError(f"invalid grammar: {message}{where}")

    def space(self, pos, newline_ok):
        return (_SPACE_NL if newline_ok else _SPACE).match(self.src, pos).end()

    def symbol(self, name):
        return self.symbols.setdefault(name, len(self.symbols))

    def generate(self, base):
        rule_id = len(self.symbols)
        self.symbols[f"{base}_{rule_id}"] = rule_id
        if rule_id >= MAX_RULES:
            self.fail(f"more than {MAX_RULES} rules (with those made for groups and repetitions)")
        return rule_id

    def add_rule(self, rule_id, alternatives):
        self.rules[rule_id] = alternatives
        self.n_elements += sum(_weight(a) + 1 for a in alternatives)
        if self.n_elements > MAX_ELEMENTS:
            self.fail(f"the grammar expands to more than {MAX_ELEMENTS} elements (long literals "
                      "or groups under large repetition counts)")

    def parse(self):
        pos = self.space(0, True)
        while pos < self.n:
            pos = self.rule(pos)
        for rule_id in self.symbols.values():
            if rule_id not in self.rules:
                name = next(k for k, v in self.symbols.items() if v == rule_id)
                self.fail(f"undefined rule '{name}'")

    def rule(self, pos):
        m = _WORD.match(self.src, pos)
        if not m:
            self.fail("expecting a rule name", pos)
        name = m.group()
        rule_id = self.symbol(name)
        pos = self.space(m.end(), False)
        if not self.src.startswith("::=", pos):
            self.fail("expecting ::=", pos)
        pos = self.space(pos + 3, True)
        pos = self.alternates(pos, name, rule_id, False)
        if self.src.startswith("\r\n", pos):
            pos += 2
        elif pos < self.n and self.src[pos] in "\r\n":
            pos += 1
        elif pos < self.n:
            self.fail("expecting newline or end", pos)
        return self.space(pos, True)

    def alternates(self, pos, name, rule_id, nested):
        alternatives = []
        seq, pos = self.sequence(pos, name, nested)
        alternatives.append(seq)
        while pos < self.n and self.src[pos] == "|":
            pos = self.space(pos + 1, True)
            seq, pos = self.sequence(pos, name, nested)
            alternatives.append(seq)
        self.add_rule(rule_id, alternatives)
        return pos

    def sequence(self, pos, name, nested):
        src, n = self.src, self.n
        seq = []
        last = 0                    # where the last symbol starts in seq
        n_prev_rules = 1
        while pos < n:
            c = src[pos]
            if c == '"' or c == "[":
                # a literal or a character class: one entry weighing its elements (its
                # characters, an upper bound), read by one regular expression
                m = (_LITERAL if c == '"' else _CLASS).match(src, pos)
                if not m:
                    self.fail("unexpected end of input")
                body = m.group(1)
                if "\\" in body:
                    bad = next((e for e in _ESCAPES.finditer(body) if e.group(1)), None)
                    if bad:
                        self.fail(f"unknown escape {bad.group(1)}", pos + 1 + bad.start())
                last, n_prev_rules = len(seq), 1
                if body:
                    seq.append((_CHAR, len(body)))
                pos = self.space(m.end(), nested)
            elif c in "<!":
                start = pos
                if c == "!":
                    pos += 1
                if not src.startswith("<", pos):
                    self.fail("expecting '<'", pos)
                end = src.find(">", pos)
                if end < 0:
                    self.fail("expecting '>'", pos)
                if src.startswith("<[", pos):
                    m = _INT.match(src, pos + 2)
                    if not m or m.end() != end - 1 or src[end - 1] != "]":
                        self.fail("expecting a token id as <[id]>", start)
                    token = int(m.group())
                    if token > 0xFFFFFFFF or (self.n_vocab is not None and token >= self.n_vocab):
                        self.fail(f"token id {token} is outside the vocabulary (n_vocab "
                                  f"{self.n_vocab})", start)
                last, n_prev_rules = len(seq), 1
                seq.append((_TOKEN, 0))
                pos = self.space(end + 1, nested)
            elif c.isascii() and (c.isalnum() or c == "-"):
                m = _WORD.match(src, pos)
                ref = self.symbol(m.group())
                pos = self.space(m.end(), nested)
                last, n_prev_rules = len(seq), 1
                seq.append((_REF, ref))
            elif c == "(":
                self.depth += 1
                if self.depth > MAX_NESTING:
                    self.fail(f"parentheses nested more than {MAX_NESTING} deep", pos)
                pos = self.space(pos + 1, True)
                n_before = len(self.symbols)
                sub = self.generate(name)
                pos = self.alternates(pos, name, sub, True)
                self.depth -= 1
                n_prev_rules = max(1, len(self.symbols) - n_before)
                last = len(seq)
                seq.append((_REF, sub))
                if pos >= n or src[pos] != ")":
                    self.fail("expecting ')'", pos)
                pos = self.space(pos + 1, nested)
            elif c == ".":
                last, n_prev_rules = len(seq), 1
                seq.append((_CHAR, 1))
                pos = self.space(pos + 1, nested)
            elif c in "*+?":
                pos = self.space(pos + 1, nested)
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
                seq, n_prev_rules = self.repeat(seq, last, lo, hi, n_prev_rules, name, pos)
            elif c == "{":
                pos = self.space(pos + 1, nested)
                m = _INT.match(src, pos)
                if not m:
                    self.fail("expecting an int", pos)
                lo = int(m.group())
                pos = self.space(m.end(), nested)
                if pos < n and src[pos] == "}":
                    hi = lo
                elif pos < n and src[pos] == ",":
                    pos = self.space(pos + 1, nested)
                    hi = None
                    m = _INT.match(src, pos)
                    if m:
                        hi = int(m.group())
                        pos = self.space(m.end(), nested)
                    if pos >= n or src[pos] != "}":
                        self.fail("expecting '}'", pos)
                else:
                    self.fail("expecting ',' or '}'", pos)
                pos = self.space(pos + 1, nested)
                if lo >= 2 ** 64 or (hi is not None and hi >= 2 ** 64):
                    self.fail("a repetition count out of range", pos)
                if lo > MAX_REPETITION:
                    self.fail(f"{lo} repetitions, over llama.cpp's limit of {MAX_REPETITION}", pos)
                if hi is not None and hi > MAX_REPETITION:
                    hi = None
                if hi is not None and hi < lo:
                    # llama.cpp computes hi - lo unsigned and loops ~2**64 times
                    self.fail(f"repetition {{{lo},{hi}}} has its maximum below its minimum", pos)
                seq, n_prev_rules = self.repeat(seq, last, lo, hi, n_prev_rules, name, pos)
            else:
                break
        return seq, pos

    def repeat(self, seq, last, lo, hi, n_prev_rules, name, pos):
        """llama.cpp's rewrite of S{lo,hi}: lo copies of S, then hi - lo optional ones (rules
        S' ::= S S'' |), or one recursive S' ::= S S' | when there is no maximum."""
        if last == len(seq):
            self.fail("expecting an item before */+/?/{", pos)
        prev = seq[last:]
        total = hi if hi is not None and hi > 0 else (lo if lo > 0 else 1)
        if n_prev_rules * total > MAX_REPETITION:
            self.fail("repetitions nested too deep (llama.cpp's limit: their product is at most "
                      f"{MAX_REPETITION})", pos)
        n_opt = 1 if hi is None else hi - lo
        if (lo + n_opt) * (_weight(prev) + 3) + self.n_elements > MAX_ELEMENTS:
            self.fail(f"the grammar expands to more than {MAX_ELEMENTS} elements (long literals "
                      "or groups under large repetition counts)", pos)
        seq = seq[:last] + prev * lo
        last_rec = None
        for i in range(n_opt):
            rec = self.generate(name)
            ref = rec if hi is None else last_rec
            self.add_rule(rec, [prev + ([(_REF, ref)] if (i > 0 or hi is None) else []), []])
            last_rec = rec
        if n_opt > 0:
            seq.append((_REF, last_rec))
        return seq, n_prev_rules * total


def _analyse(rules, n_rules):
    """The costs of llama.cpp's steps after parsing, each in linear time over the rules:
    the left-recursion check's recursion depth and call count, and the number of stacks a rule
    expands to (the paths to its first terminals)."""
    # rules that may derive the empty string, as llama.cpp's check decides it: an empty alternative
    may_be_empty = [any(len(a) == 0 for a in rules[r]) for r in range(n_rules)]
    # leftmost references of each rule: as llama.cpp's check walks them (a ref, then the next
    # one while the previous may be empty), per alternative
    def leftmost(r):
        out = []
        for alt in rules[r]:
            for kind, value in alt:
                if kind != _REF:
                    break
                out.append(value)
                if not may_be_empty[value]:
                    break
        return out

    left = [leftmost(r) for r in range(n_rules)]
    # iterative DFS: depth of the leftmost chains (llama.cpp recurses that deep), left recursion,
    # and visits(r) = 1 + sum(visits(c)): the calls llama.cpp makes, since it re-walks shared rules
    depth = [0] * n_rules
    visits = [0] * n_rules
    state = [0] * n_rules           # 0 new, 1 in progress, 2 done
    for root in range(n_rules):
        if state[root]:
            continue
        stack = [(root, 0)]
        state[root] = 1
        while stack:
            r, i = stack[-1]
            if i < len(left[r]):
                stack[-1] = (r, i + 1)
                c = left[r][i]
                if state[c] == 1:
                    raise GrammarError("invalid grammar: left recursion (a rule that can start with "
                                       "itself), which llama.cpp does not support")
                if state[c] == 0:
                    state[c] = 1
                    stack.append((c, 0))
                continue
            stack.pop()
            state[r] = 2
            depth[r] = 1 + max((depth[c] for c in left[r]), default=0)
            visits[r] = min(1 + sum(visits[c] for c in left[r]), MAX_LEFT_VISITS + 1)
    # stacks: llama_grammar_advance_stack expands a leading rule reference into one stack per
    # alternative of that rule (and goes on past references that may be empty)
    paths = [0] * n_rules
    for r in sorted(range(n_rules), key=depth.__getitem__):     # references before their users
        total = 0
        for alt in rules[r]:
            for kind, value in alt:
                if kind != _REF:
                    total += 1
                    break
                total += paths[value]
                if not may_be_empty[value]:
                    break
            else:
                total += 1
        paths[r] = min(total, MAX_STACKS + 1)
    return max(depth, default=0), max(visits, default=0), max(paths, default=0)


def check_grammar(text, root="root", n_vocab=None) -> dict:
    """Raise GrammarError unless llama.cpp can build the GBNF grammar text safely and quickly.

    Checks the syntax as llama.cpp's parser reads it, that root is defined, and that the
    grammar's shape is within this module's limits (nesting, chains of leftmost rule references,
    stacks, size); <[id]> tokens must be below n_vocab when given.  Takes time linear in the
    grammar's length.  Returns {n_rules, n_elements, nesting, left_chain, left_visits, stacks}.
    """
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise GrammarError(f"invalid grammar: not UTF-8 ({e.reason} at byte {e.start})") from None
    if not isinstance(text, str):
        raise TypeError(f"a grammar is a str, not {type(text).__name__}")
    if "\0" in text:
        raise GrammarError("invalid grammar: a NUL character (llama.cpp would stop reading there)")
    nesting = _nesting(text)
    if nesting > MAX_NESTING:
        raise GrammarError(f"invalid grammar: parentheses nested {nesting} deep; llama.cpp's parser "
                           f"supports at most {MAX_NESTING}")
    p = _Parser(text, n_vocab)
    p.parse()
    if not p.rules:
        raise GrammarError("invalid grammar: no rules")
    root_name = root.decode() if isinstance(root, bytes) else root
    if root_name not in p.symbols:
        raise GrammarError(f"invalid grammar: no '{root_name}' rule")
    n_rules = len(p.symbols)
    rules = [p.rules[i] for i in range(n_rules)]
    left_chain, left_visits, stacks = _analyse(rules, n_rules)
    if left_chain > MAX_LEFT_CHAIN:
        raise GrammarError(f"invalid grammar: a chain of {left_chain} rules, each starting with the "
                           f"next; llama.cpp supports at most {MAX_LEFT_CHAIN}")
    if left_visits > MAX_LEFT_VISITS:
        raise GrammarError("invalid grammar: rules whose alternatives start with the same rules "
                           f"over and over; llama.cpp's check of it would take over {MAX_LEFT_VISITS} "
                           "steps (exponential in the depth)")
    if stacks > MAX_STACKS:
        raise GrammarError(f"invalid grammar: a rule with over {MAX_STACKS} ways to start (e.g. a "
                           "huge alternation); llama.cpp's cost grows with their square")
    return {"n_rules": n_rules, "n_elements": p.n_elements, "nesting": nesting,
            "left_chain": left_chain, "left_visits": left_visits, "stacks": stacks}
