"""Generated tokens -> text for one completion: incremental decoding and stop strings.

    ts = CompletionText(tokenizer, stop=["\\n\\n"])
    delta, used = ts.push([17, 42])     # new text that is final; how many of the ids were used
    if ts.stopped: ...                  # a stop string ended the text (it is not included)
    delta = ts.finish()                 # the rest, once the sequence has ended

Text that could still turn out to be the beginning of a stop string is held back, so the pieces
streamed equal the whole text of a non-streamed completion. Without a tokenizer the text stays
empty (the token ids are the output).
"""

from __future__ import annotations

__all__ = ["CompletionText"]


class CompletionText:
    def __init__(self, tokenizer=None, stop: list[str] | tuple[str, ...] = ()):
        if stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self._dec = tokenizer.stream() if tokenizer is not None else None
        self._stop = tuple(stop)
        self._text = ""  # decoded so far (cut at a stop string)
        self._sent = 0  # characters of _text released
        self.stopped = False  # a stop string was found

    def push(self, ids) -> tuple[str, int]:
        """Decode ``ids``; returns (text now final, number of ids used: fewer than given when a
        stop string ended the text)."""
        if self._dec is None:
            return "", len(ids)
        if not self._stop:  # nothing to hold back or cut: all the decoded text is final
            text = self._dec.push_many(ids)
            self._text += text
            self._sent = len(self._text)
            return text, len(ids)
        used = 0
        for t in ids:
            if self.stopped:
                break
            self._text += self._dec.push(int(t))
            used += 1
            self._cut_at_stop()
        return self._release(final=self.stopped), used

    def finish(self) -> str:
        """The remaining text after the last token."""
        if self._dec is not None and not self.stopped:
            self._text += self._dec.flush()
            self._cut_at_stop()
        return self._release(final=True)

    @property
    def text(self) -> str:
        return self._text

    def _cut_at_stop(self) -> None:
        if not self._stop:
            return
        # a match cannot start before _sent (text that could begin one is held back); the last
        # characters may complete one that began before this token: search from the held part
        hits = [j for j in (self._text.find(s, self._sent) for s in self._stop) if j >= 0]
        if hits:
            self._text = self._text[: min(hits)]
            self.stopped = True

    def _release(self, final: bool) -> str:
        end = len(self._text)
        if not final and self._stop:
            end -= self._held()
        out = self._text[self._sent : end]
        self._sent = max(self._sent, end)
        return out

    def _held(self) -> int:
        """Length of the longest end of the text that is a proper beginning of a stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self._text) - self._sent), best, -1):
                if self._text.endswith(s[:k]):
                    best = k
                    break
        return best
