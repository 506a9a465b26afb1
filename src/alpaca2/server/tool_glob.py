"""llama.cpp's glob (common.cpp's glob_match), which the built-in tools' include/exclude use:
'*' matches any run of characters but '/', '**' any run at all, '?' one character but '/',
'[...]' a class ('!' negates, 'a-z' ranges, a leading ']' or '-' is literal).

Matched by simulating the pattern as a small automaton, linear in the text for a given pattern
(llama.cpp's recursive matcher backtracks; the answers are the same)."""
from __future__ import annotations

import functools


def _class_match(c: str, body: str) -> bool:
    i, negated = 0, False
    if body[:1] == "!":
        negated, i = True, 1
    if i < len(body) and body[i] in "]-":
        if body[i] == c:
            return not negated
        i += 1
    matched = False
    while i < len(body):
        if i + 2 < len(body) and body[i + 1] == "-" and body[i + 2] != "]":
            if body[i] <= c <= body[i + 2]:
                matched = True
                break
            i += 3
        else:
            if body[i] == c:
                matched = True
                break
            i += 1
    return matched != negated


@functools.lru_cache(maxsize=256)
def _tokens(pattern: str) -> tuple:
    """('**',) ('*',) ('?',) ('[', body) or ('=', char) per pattern element."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(("**",))
            i += 2
        elif pattern[i] == "*":
            out.append(("*",))
            i += 1
        elif pattern[i] == "?":
            out.append(("?",))
            i += 1
        elif pattern[i] == "[":
            end = i + 1
            if end < len(pattern) and pattern[end] in "]-":
                end += 1
            end = pattern.find("]", end)
            if end < 0:              # no closing bracket: a literal '['
                out.append(("=", "["))
                i += 1
            else:
                out.append(("[", pattern[i + 1:end]))
                i = end + 1
        else:
            out.append(("=", pattern[i]))
            i += 1
    return tuple(out)


def glob_match(pattern: str, text: str) -> bool:
    """Whether text matches pattern as a whole."""
    tokens = _tokens(pattern)
    n = len(tokens)

    def closure(states):
        stack, seen = list(states), set(states)
        while stack:
            s = stack.pop()
            if s < n and tokens[s][0] in ("*", "**") and s + 1 not in seen:
                seen.add(s + 1)
                stack.append(s + 1)
        return seen

    states = closure({0})
    for c in text:
        nxt = set()
        for s in states:
            if s == n:
                continue
            kind = tokens[s][0]
            if kind == "**":
                nxt.add(s)
            elif kind == "*":
                if c != "/":
                    nxt.add(s)
            elif kind == "?":
                if c != "/":
                    nxt.add(s + 1)
            elif kind == "[":
                if _class_match(c, tokens[s][1]):
                    nxt.add(s + 1)
            elif tokens[s][1] == c:
                nxt.add(s + 1)
        if not nxt:
            return False
        states = closure(nxt)
    return n in states


def path_glob_match(pattern: str, rel_path: str) -> bool:
    """A pattern without '/' matches the base name at any depth; one with '/' the whole relative
    path, anchored with '**/' unless it starts with '**' or '/' already."""
    if "/" not in pattern:
        return glob_match(pattern, rel_path.rsplit("/", 1)[-1])
    if pattern == "**" or pattern.startswith("**/") or pattern.startswith("/"):
        return glob_match(pattern, rel_path)
    return glob_match("**/" + pattern, rel_path)
