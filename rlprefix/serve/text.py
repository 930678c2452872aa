"""A completion's text as its tokens arrive: incremental detokenisation and stop strings (`TextStream`)."""
from __future__ import annotations

import logging

log = logging.getLogger("rlprefix.serve.text")


class TextStream:
    """A completion's text as its tokens arrive: incremental detokenisation and stop strings.

    `add(ids)` returns the text that can be released now. New text is the difference of decoded prefixes, decoded
    over a window that starts a token or so back (so a step costs O(1) whatever the length; merged and multi-byte
    tokens come out right), and is held back while it ends in an incomplete character (U+FFFD) or in what may be the
    start of a stop string. The text ends at the first stop string to be completed, which is never released.
    `close()` releases the rest (the decode of all tokens, cut at a stop string). Adding the tokens one at a time or
    all at once gives the same text.
    """

    def __init__(self, tok, stops: list[str]):
        self.tok, self.stops = tok, [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""       # decoded so far: complete characters only
        self.sent = 0        # characters of `text` released
        self.stopped = False  # a stop string was completed: `text` ends before it
        self._prefix = self._read = 0  # the decode window: ids[_prefix:_read] was decoded into text already
        self._checked = 0    # text[:_checked] holds no complete stop string

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, ids: list[int]) -> str:
        if self.stopped:
            return ""
        self.ids += ids
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def close(self) -> str:
        if self.stopped:
            return ""
        full = self._decode(self.ids)
        if full.startswith(self.text):
            self.text = full  # whatever the window held back (a trailing incomplete character)
        else:  # the windowed decode disagreed with the full one (not seen with byte-level BPE): keep what was sent
            log.warning("incremental detokenisation differs from the full decode: %r vs %r", self.text, full)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        hits = []
        for s in self.stops:
            at = self.text.find(s, max(0, self._checked - len(s) + 1))
            if at >= 0:
                hits.append((at + len(s), at))
        self._checked = end
        if hits:  # the first stop string to be completed (the longer one on a tie) ends the text
            end, self.stopped = min(hits)[1], True
        elif not final:  # hold back a tail that may grow into a stop string
            for k in range(min(max((len(s) for s in self.stops), default=1) - 1, end - self.sent), 0, -1):
                tail = self.text[end - k:]
                if any(len(s) > k and s.startswith(tail) for s in self.stops):
                    end -= k
                    break
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        if self.stopped:
            self.text = self.text[:end]
        return piece
