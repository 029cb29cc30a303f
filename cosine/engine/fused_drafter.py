"""FusedDrafter: several expert drafters of one process drafting in lockstep, fused into one token tree.

Each expert keeps its own KV rows (a :class:`Drafter`). A round first aligns every expert's row with the
request's committed tokens; then, per depth, each expert runs one batched forward over the rows of the
requests that use it and offers its top-``width`` candidates. :func:`fuse_position` picks the spine (the
most confident top-1 candidate), which extends the tree and is fed to *all* of the request's experts
next, so they keep drafting from the same prefix; the candidates they disagreed on become sibling leaves
of the spine node. With one expert this is exactly :meth:`Drafter.draft` with the same width.

The experts' top-1 tokens at every depth (their *votes*) and confidences come back with the tree, so the
caller can score each expert's agreement with what the target then commits (expertise routing).
Sampled proposals are not fused: the caller drafts those with a single :class:`Drafter`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from cosine.engine.drafter import Drafter, DraftRequest
from cosine.engine.tree import DraftTree
from cosine.policy.fusion import fuse_position

log = logging.getLogger(__name__)


@dataclass
class FusedRequest:
    seq_id: str
    tokens: list[int]  # all committed tokens of the sequence
    k: int  # draft positions wanted
    experts: list[str]  # the drafters that draft together, best first
    width: int = 1  # candidates each expert offers per position
    # Most alternatives per position (None: every distinct candidate, len(experts) * width - 1).
    max_alternatives: int | None = None
    # Trust per expert (the router's relative scores, best = 1): a candidate's confidence is scaled by its
    # expert's trust when the spine is chosen, so an overconfident out-of-domain drafter does not take over.
    weights: dict[str, float] | None = None


@dataclass
class FusedDraft:
    tree: DraftTree
    votes: dict[str, list[int]] = field(default_factory=dict)  # expert -> its top-1 token per depth
    vote_confidence: dict[str, list[float]] = field(default_factory=dict)  # expert -> that token's probability


class FusedDrafter:
    def __init__(self, drafters: dict[str, Drafter]) -> None:
        self.drafters = drafters

    def release(self, seq_ids: list[str]) -> None:
        for d in self.drafters.values():
            d.release(seq_ids)

    def _check(self, req: FusedRequest) -> None:
        if not req.experts:
            raise ValueError(f"{req.seq_id}: a fused request needs at least one expert")
        unknown = [e for e in req.experts if e not in self.drafters]
        if unknown:
            raise ValueError(f"{req.seq_id}: unknown experts {unknown}; have {sorted(self.drafters)}")
        if req.width < 1:
            raise ValueError(f"{req.seq_id}: width must be >= 1, got {req.width}")

    def draft(self, requests: list[FusedRequest]) -> dict[str, FusedDraft]:
        """Draft every request with its experts: per depth one forward per expert; a fused tree per sequence."""
        requests = [r for r in requests if r.k > 0]
        for r in requests:
            self._check(r)
        if not requests:
            return {}
        by_id = {r.seq_id: r for r in requests}
        experts = sorted({e for r in requests for e in r.experts})
        # feed[e][sid]: the tokens expert e still has to be fed for sequence sid.
        feed: dict[str, dict[str, list[int]]] = {}
        for e in experts:
            mine = [DraftRequest(r.seq_id, r.tokens, r.k) for r in requests if e in r.experts]
            feed[e] = self.drafters[e]._catch_up(mine)
        out = {
            r.seq_id: FusedDraft(DraftTree(), {e: [] for e in r.experts}, {e: [] for e in r.experts})
            for r in requests
        }
        spine_parent = {r.seq_id: -1 for r in requests}
        depth = 0
        while any(feed.values()):
            depth += 1
            # candidates[sid][e]: expert e's top-width (token, prob) for sequence sid at this depth.
            candidates: dict[str, dict[str, list[tuple[int, float]]]] = {}
            for e in experts:
                if not feed[e]:
                    continue
                for sid, logits in self.drafters[e].step(feed[e]).items():
                    probs = torch.softmax(logits.float(), dim=-1)
                    top = torch.topk(probs, min(by_id[sid].width, probs.shape[-1]))
                    candidates.setdefault(sid, {})[e] = list(zip(top.indices.tolist(), top.values.tolist()))
            next_feed: dict[str, dict[str, list[int]]] = {e: {} for e in experts}
            for sid, cands in candidates.items():
                req, draft = by_id[sid], out[sid]
                cap = req.max_alternatives if req.max_alternatives is not None else len(req.experts) * req.width - 1
                if req.weights:
                    ranked = {e: [(t, p * req.weights.get(e, 1.0)) for t, p in c] for e, c in cands.items()}
                else:
                    ranked = cands
                fused = fuse_position(ranked, cap)
                for e, c in cands.items():
                    draft.votes[e].append(c[0][0])
                    draft.vote_confidence[e].append(c[0][1])
                parent = spine_parent[sid]
                spine = draft.tree.add(fused.spine_token, parent, fused.spine_confidence, fused.spine_source)
                spine_parent[sid] = spine
                for tok, conf, src in fused.alternatives:
                    draft.tree.add(tok, parent, conf, src)
                if depth < req.k:
                    for e in req.experts:
                        next_feed[e][sid] = [fused.spine_token]
            feed = next_feed
        return out
