"""Which outcomes of a verification pass a drafter drafts ahead for (pure; no torch, no Redis).

While the verifier checks a draft, its drafter can draft the next round for the outcomes it expects and send
each as a bet (:mod:`cosine.service.drafter_service`). An outcome is what the pass commits after the tokens
the drafter was sent: the draft's spine accepted whole and a bonus token (the drafter's own guess, drafted as
the first position of that bet), or the spine accepted up to depth ``j - 1`` and the target's token at depth
``j`` in place of the drafter's: one of its runners-up there, the likeliest candidates the tree did not hold.

Likelihoods use the drafter's own probabilities as stand-ins for the target's: reaching depth ``j`` is the
product of the spine's confidences before it, and the runner-up's chance is its probability.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    depth: int  # the depth the target rejects (0: none, the whole spine accepted)
    assumed: tuple[int, ...]  # the tokens committed after the last ones sent (a guessed bonus not included)
    likelihood: float


def outcomes(spine: list[int], confidences: list[float],
             runners_up: list[list[tuple[int, float]]]) -> list[Outcome]:
    """Every outcome worth a bet, most likely first (the whole spine accepted is always one, first among
    equals). ``confidences[i]`` and ``runners_up[i]``: the spine node at depth ``i + 1`` and the likeliest
    candidates not in the tree there."""
    reach = 1.0
    found = []
    for j, conf in enumerate(confidences[: len(spine)], start=1):
        for token, p in runners_up[j - 1] if j - 1 < len(runners_up) else []:
            found.append(Outcome(j, tuple(spine[: j - 1]) + (token,), reach * p))
        reach *= conf
    found.append(Outcome(0, tuple(spine), reach))
    return sorted(found, key=lambda o: (-o.likelihood, o.depth != 0))


def choose(per_request: dict[str, list[Outcome]], rows: int) -> dict[str, list[Outcome]]:
    """The outcomes to draft within ``rows`` drafter rows: every request's whole-spine outcome (its own row),
    then the likeliest of the others across requests while rows remain."""
    chosen = {rid: [o for o in outs if o.depth == 0] for rid, outs in per_request.items()}
    spare = max(0, rows - sum(len(v) for v in chosen.values()))
    rest = sorted(((o.likelihood, rid, o) for rid, outs in per_request.items() for o in outs if o.depth),
                  key=lambda t: -t[0])
    for _, rid, o in rest[:spare]:
        chosen[rid].append(o)
    return chosen
