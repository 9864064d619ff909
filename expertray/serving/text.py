"""Token ids → text as they come, with OpenAI `stop` strings: text that could still turn into a stop string, or
an unfinished multi-byte character, is held back until the next tokens decide it."""

from __future__ import annotations

from typing import Any


class TextStream:
    """One sequence's output text. `push` returns the text now safe to send; after a stop string it returns
    the text before it and `stopped` is set (the stop string itself is never sent)."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already sent
        self.stopped = False

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token_ids: list[int]) -> str:
        if self.stopped or not token_ids:
            return ""
        self.ids.extend(token_ids)
        text = self._decoded()
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return self._take(text, cut)
        end = len(text) - self._held(text)
        return self._take(text, end)

    def flush(self) -> str:
        """At the end of the sequence: whatever was held back (no stop string came)."""
        if self.stopped:
            return ""
        text = self._decoded()
        return self._take(text, len(text))

    def _take(self, text: str, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = text[self.sent:end], end
        return piece

    def _first_stop(self, text: str) -> int | None:
        # a stop string may start up to len(stop) - 1 characters before the unsent text
        start = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        found = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _held(self, text: str) -> int:
        """How many trailing characters to hold back: an incomplete character, or a prefix of a stop string."""
        if text.endswith("\ufffd"):
            return len(text) - len(text.rstrip("\ufffd"))
        return max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
