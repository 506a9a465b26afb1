"""edit_file's text replacement, as llama-server's: every old_text must occur once in the file
(matched against the original, not one edit after another), edits must not overlap, and when an
old_text is not found exactly it may still match after a fuzzy normalization (trailing blanks,
smart quotes, dashes, special spaces), in which case the lines no edit touches keep their bytes.

Works on str (the file decoded as UTF-8); the caller encodes the result back."""
from __future__ import annotations

_SUBSTITUTIONS = (
    [(chr(c), "'") for c in (0x2018, 0x2019, 0x201A, 0x201B)]           # smart single quotes
    + [(chr(c), '"') for c in (0x201C, 0x201D, 0x201E, 0x201F)]         # smart double quotes
    + [(chr(c), "-") for c in range(0x2010, 0x2016)] + [("\u2212", "-")]  # dashes, minus sign
    + [("\u00a0", " ")] + [(chr(c), " ") for c in range(0x2002, 0x200B)]  # special spaces
    + [("\u202f", " "), ("\u205f", " "), ("\u3000", " ")]
)


class EditError(ValueError):
    """An edit that cannot be applied; its message is the tool's error text."""


def _normalize_line(line: str) -> str:
    s = line.rstrip(" \t\r")
    for a, b in _SUBSTITUTIONS:
        s = s.replace(a, b)
    return s


def normalize(content: str) -> str:
    """The per-line fuzzy form; line count and positions of line breaks are kept."""
    return "\n".join(_normalize_line(line) for line in content.split("\n"))


def _count(content: str, needle: str) -> int:
    return content.count(needle) if needle else 0        # non-overlapping, as llama-server counts


def _split_keep_newline(content: str) -> list:
    """Lines split on '\\n' only, each with its '\\n' (the last one may lack it)."""
    out, start = [], 0
    while start < len(content):
        nl = content.find("\n", start)
        if nl < 0:
            out.append(content[start:])
            break
        out.append(content[start:nl + 1])
        start = nl + 1
    return out


def _apply(content: str, matched: list, offset: int = 0) -> str:
    """matched: (edit index, start, length, new_text), ascending and disjoint."""
    result = content
    for _, start, length, new_text in reversed(matched):
        local = start - offset
        result = result[:local] + new_text + result[local + length:]
    return result


def _apply_preserving_unchanged_lines(original: str, base: str, matched: list) -> str:
    original_lines = _split_keep_newline(original)
    spans, offset = [], 0
    for line in _split_keep_newline(base):
        spans.append((offset, offset + len(line)))
        offset += len(line)
    groups = []         # [start line, end line (exclusive), [edits]]
    for rep in matched:
        start, end = rep[1], rep[1] + rep[2]
        first = next((i for i, (a, b) in enumerate(spans) if a <= start < b), None)
        if first is None:
            first, last = 0, 0
        else:
            last = first
            while last < len(spans) and spans[last][1] < end:
                last += 1
            if last >= len(spans):
                first, last = 0, 0
            else:
                last += 1
        if groups and first < groups[-1][1]:
            groups[-1][1] = max(groups[-1][1], last)
            groups[-1][2].append(rep)
        else:
            groups.append([first, last, [rep]])
    out, line_index = [], 0
    for first, last, reps in groups:
        out.extend(original_lines[line_index:first])
        a, b = spans[first][0], spans[last - 1][1]
        out.append(_apply(base[a:b], reps, a))
        line_index = last
    out.extend(original_lines[line_index:])
    return "".join(out)


def apply_edits(original: str, edits: list, path: str) -> str:
    """The new content; edits: [(old_text, new_text)] (old_text non-empty). Raises EditError."""
    any_fuzzy = False
    for i, (old, _) in enumerate(edits):
        if old in original:
            continue
        if normalize(old) not in normalize(original):
            raise EditError(f"could not find edits[{i}].old_text in {path}, it must match the file's "
                            "current content exactly")
        any_fuzzy = True
    base = normalize(original) if any_fuzzy else original
    matched = []
    for i, (old, new) in enumerate(edits):
        needle = normalize(old) if any_fuzzy else old
        # uniqueness on the fuzzy form always: a whitespace-only duplicate still counts
        occurrences = _count(normalize(original), normalize(old))
        if occurrences > 1:
            raise EditError(f"found {occurrences} occurrences of edits[{i}].old_text in {path}, it must be unique")
        matched.append((i, base.find(needle), len(needle), new))
    matched.sort(key=lambda m: m[1])
    for prev, cur in zip(matched, matched[1:]):
        if prev[1] + prev[2] > cur[1]:
            raise EditError(f"edits[{prev[0]}] and edits[{cur[0]}] overlap in {path}; merge them into one edit "
                            "or target disjoint regions")
    new_content = _apply_preserving_unchanged_lines(original, base, matched) if any_fuzzy else _apply(base, matched)
    if new_content == original:
        raise EditError("no changes made: the replacement(s) produced identical content")
    return new_content
