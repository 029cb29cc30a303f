"""Stop strings: end a sequence at the first token whose text completes one of its stop strings."""

from __future__ import annotations

from cosine.engine.sequence import FinishReason, Sequence


def apply_stop_strings(seq: Sequence, tokenizer, new_tokens: int) -> bool:
    """Check the text that the last ``new_tokens`` tokens completed; on a hit, cut the output after the
    token that completed the stop string and finish the sequence. Returns whether it stopped."""
    if not seq.params.stop or tokenizer is None or new_tokens <= 0:
        return False
    out = seq.output_ids
    longest = max(len(s) for s in seq.params.stop)
    # Look back far enough to catch a stop string that started before this round's tokens.
    start = max(0, len(out) - new_tokens - longest)
    for end in range(len(out) - new_tokens + 1, len(out) + 1):
        text = tokenizer.decode(out[start:end])
        if any(stop in text for stop in seq.params.stop):
            del out[end:]
            seq.finish_reason = FinishReason.STOP
            return True
    return False


def visible_text(seq: Sequence, tokenizer) -> str:
    """The output text as a user sees it: decoded, cut before the first stop string."""
    text = tokenizer.decode(seq.output_ids)
    cut = min((text.find(s) for s in seq.params.stop if s in text), default=-1)
    return text[:cut] if cut >= 0 else text
