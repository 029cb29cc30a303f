"""Incremental text for streamed output: only text that can no longer change is emitted.

Held back until more tokens arrive: a trailing incomplete UTF-8 character (decoded as U+FFFD) and, while
the request runs, any tail that could still grow into one of its stop strings. A stop string itself is
never emitted.
"""

from __future__ import annotations

from dataclasses import dataclass

from cosine.engine.sequence import Sequence
from cosine.engine.stopping import visible_text


@dataclass
class TextStream:
    emitted: int = 0  # characters already sent

    def delta(self, seq: Sequence, tokenizer, finished: bool) -> str:
        text = visible_text(seq, tokenizer)
        if not finished:
            while text.endswith("\ufffd"):
                text = text[:-1]
            hold = _stop_prefix_tail(text, seq.params.stop)
            if hold:
                text = text[:-hold]
        if len(text) <= self.emitted:
            return ""
        out = text[self.emitted :]
        self.emitted = len(text)
        return out


def _stop_prefix_tail(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                best = max(best, n)
                break
    return best
