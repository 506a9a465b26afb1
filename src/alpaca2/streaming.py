"""Streaming text: token pieces (bytes) become text that is UTF-8 safe; stop strings are matched
across token boundaries and never leaked."""
from __future__ import annotations

import codecs
from typing import Sequence



class TextStream:
    """Turns token pieces (bytes) into text: incomplete UTF-8 is held back, stop strings cut."""

    def __init__(self, stop: Sequence[str] = (), strip_leading_space: bool = False):
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._decode = self._decoder.decode
        self.stop = [s for s in stop if s]
        self._pending = ""
        self._strip = strip_leading_space
        self.stopped = False
        self._parts: list[str] = []       # the text so far, joined when read (no copy per token)

    @property
    def text(self) -> str:
        """All the text released so far."""
        parts = self._parts
        if len(parts) > 1:
            parts[:] = ["".join(parts)]
        return parts[0] if parts else ""

    def push(self, piece: bytes) -> str:
        """Add a token's bytes; return the text that is safe to show now."""
        if self.stopped:
            return ""
        new = self._decode(piece)
        if self._strip and new:
            self._strip = False           # strip one leading space, once
            if new.startswith(" "):
                new = new[1:]
        if not self.stop:                 # nothing to cut or hold back: all of it is safe
            if new:
                self._parts.append(new)
            return new
        return self._release(self._pending + new, final=False)

    def finish(self) -> str:
        """The rest of the text.  A character cut off by the end of generation (max_tokens hit
        inside a multi-byte character) is dropped, never shown as U+FFFD."""
        if self.stopped:
            return ""
        self._decoder.reset()
        return self._release(self._pending, final=True)

    def _release(self, buf: str, final: bool) -> str:
        cut = -1
        for s in self.stop:
            i = buf.find(s)
            if i != -1 and (cut == -1 or i < cut):
                cut = i
        if cut != -1:
            self.stopped = True
            self._pending = ""
            out = buf[:cut]
        elif final:
            self._pending = ""
            out = buf
        else:
            keep = 0          # the longest tail of buf that may be the start of a stop string
            for s in self.stop:
                for k in range(min(len(s) - 1, len(buf)), 0, -1):
                    if buf.endswith(s[:k]):
                        keep = max(keep, k)
                        break
            out, self._pending = (buf[:-keep], buf[-keep:]) if keep else (buf, "")
        if out:
            self._parts.append(out)
        return out
