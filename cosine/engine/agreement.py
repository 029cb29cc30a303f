"""Feedback for expertise routing: how well each expert's votes agreed with what the target committed.

Agreement is soft: an expert that proposed a token close in meaning to the target's (by the target's own
input embeddings) earns more than one that proposed something unrelated, so the score carries signal
even in rounds where nobody hit the exact token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def agreement_scores(
    embedding_weight: torch.Tensor, votes: dict[str, list[int]], target_tokens: list[int]
) -> dict[str, float]:
    """Per expert, the mean over depths of ``(1 + cos) / 2`` between the embeddings of its vote and the
    target's committed token at that depth, in [0, 1].

    ``target_tokens`` are the tokens the target committed this round (the accepted draft tokens, then its
    own bonus token), so the depth that was rejected compares with the target's correction. Depths past
    either list are not scored; an expert with nothing to score is left out.
    """
    out: dict[str, float] = {}
    for expert in sorted(votes):
        n = min(len(votes[expert]), len(target_tokens))
        if n == 0:
            continue
        index = torch.tensor(votes[expert][:n] + list(target_tokens[:n]), device=embedding_weight.device)
        rows = embedding_weight[index].float()
        cos = F.cosine_similarity(rows[:n], rows[n:], dim=-1)
        out[expert] = float(((1.0 + cos) / 2.0).clamp(0.0, 1.0).mean())
    return out


def solo_acceptance(votes: dict[str, list[int]], target_tokens: list[int]) -> dict[str, float]:
    """Per expert, the acceptance length its own votes would have reached this round: 1 + the number of
    leading depths where its vote is the committed token (exact while the target follows the spine, whose
    prefix every vote was drafted from)."""
    out: dict[str, float] = {}
    for expert in sorted(votes):
        hits = 0
        for vote, token in zip(votes[expert], target_tokens):
            if vote != token:
                break
            hits += 1
        out[expert] = 1.0 + hits
    return out


def mean_confidence(vote_confidence: dict[str, list[float]]) -> dict[str, float]:
    """Per expert, the mean confidence of its top-1 candidates over the depths it drafted."""
    return {e: sum(c) / len(c) for e, c in sorted(vote_confidence.items()) if c}
