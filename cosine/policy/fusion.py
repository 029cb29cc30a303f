"""Confidence-based token fusion: one draft position from the candidates of several drafters.

The drafters of a request draft in lockstep. At each position every drafter offers its top candidates
(token, confidence), best first. The most confident top-1 candidate becomes the *spine* token: it
extends the draft and is fed to every drafter for the next position. The tokens they disagreed on
become *alternatives*, siblings of the spine node that the target checks in the same pass: first the
other drafters' top-1 choices (a drafter's first choice is its best guess, so it earns a place before
anyone's second choice), then their further candidates, each group by confidence, capped.

Ties are broken deterministically: by drafter name, then by the order a drafter listed its candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FusedPosition:
    spine_token: int
    spine_source: str  # the drafter whose top-1 candidate became the spine
    spine_confidence: float
    alternatives: list[tuple[int, float, str]] = field(default_factory=list)  # (token, confidence, source)
    agreed: list[str] = field(default_factory=list)  # drafters whose top-1 equals the spine token, by name


def fuse_position(candidates: dict[str, list[tuple[int, float]]], max_alternatives: int) -> FusedPosition:
    """Fuse one position; ``candidates`` maps drafter -> its candidates (token, confidence), best first."""
    names = sorted(n for n, c in candidates.items() if c)
    if not names:
        raise ValueError("fuse_position needs at least one drafter with a candidate")
    # max() keeps the first of equal keys: the drafter whose name sorts first wins a confidence tie.
    source = max(names, key=lambda n: candidates[n][0][1])
    spine, conf = candidates[source][0]
    agreed = [n for n in names if candidates[n][0][0] == spine]

    # Best confidence (and its source) per distinct non-spine token, and whether it was someone's top-1.
    best: dict[int, tuple[float, str]] = {}
    first_choice: set[int] = set()
    for name in names:
        for rank, (tok, c) in enumerate(candidates[name]):
            if tok == spine:
                continue
            if rank == 0:
                first_choice.add(tok)
            if tok not in best or c > best[tok][0]:
                best[tok] = (c, name)
    # ``best`` keeps first-seen order (drafters by name, then rank); the stable sort keeps it among ties.
    ordered = sorted(best, key=lambda t: (t not in first_choice, -best[t][0]))
    alternatives = [(t, best[t][0], best[t][1]) for t in ordered[: max(0, max_alternatives)]]
    return FusedPosition(spine, source, conf, alternatives, agreed)
