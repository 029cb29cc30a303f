"""Drafter: a small model that proposes draft trees for many sequences at once.

The drafter keeps its own KV rows, keyed by sequence id, and the tokens each row holds. A request brings
the sequence's committed tokens; the drafter keeps the longest common prefix of what it has cached,
rolls back the rest (its rejected drafts) and feeds the missing tokens, so an accepted draft costs
nothing to re-feed and a drafter without a row rebuilds it from the tokens it is sent.

Drafting is batched: every step is one forward over all requested rows (rows that finished earlier get
no token). At each depth the drafter's most likely token extends the spine and the next ``width - 1``
candidates become alternative leaves; in ``sampled`` mode the spine token is sampled from the drafter's
processed distribution (optionally truncated to its top ``q_top`` tokens, so that it can travel sparse),
which is sent along for rejection sampling.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from cosine.engine.runner import ModelRunner, Segment
from cosine.engine.sampling import DRAFT, keyed_uniform, probabilities, sample_with
from cosine.engine.tree import DraftTree
from cosine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

PROPOSALS = ("onehot", "sampled")


@dataclass
class DraftRequest:
    seq_id: str
    tokens: list[int]  # all committed tokens of the sequence
    k: int  # draft positions wanted
    width: int = 1  # candidates per position: 1 = chain, >1 = spine plus alternatives
    params: SamplingParams | None = None
    seed: int = 0
    position: int = 0  # output index of the first drafted token (for keyed sampling)
    proposal: str = "onehot"
    q_top: int = 0  # sampled proposals: sample from the top-q_top of the distribution (0 = all of it)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case (one extends the other), compared at C speed
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


class Drafter:
    def __init__(self, runner: ModelRunner, name: str, domain: str | None = None) -> None:
        self.runner = runner
        self.name = name
        self.domain = domain or name
        self.cached: dict[str, list[int]] = {}
        self.steps = 0

    def release(self, seq_ids: list[str]) -> None:
        present = [s for s in seq_ids if s in self.cached]
        self.runner.remove_rows(present)
        for sid in present:
            self.cached.pop(sid, None)

    def _catch_up(self, requests: list[DraftRequest]) -> dict[str, list[int]]:
        """Align each row with its sequence's tokens; returns the tokens each row still has to be fed."""
        new = [r for r in requests if r.seq_id not in self.cached]
        if new:
            self.runner.add_rows([r.seq_id for r in new], [r.tokens[:-1] for r in new])
            for r in new:
                self.cached[r.seq_id] = list(r.tokens[:-1])
        feed: dict[str, list[int]] = {}
        for r in requests:
            have = self.cached[r.seq_id]
            common = common_prefix(have, r.tokens[:-1])
            if common < len(have):
                self.runner.truncate(r.seq_id, common)
                del have[common:]
            feed[r.seq_id] = list(r.tokens[common:])
        return feed

    def draft(self, requests: list[DraftRequest]) -> dict[str, DraftTree]:
        """Draft for every request in one forward per step; returns a tree per sequence id."""
        requests = [r for r in requests if r.k > 0]
        if not requests:
            return {}
        by_id = {r.seq_id: r for r in requests}
        feed = self._catch_up(requests)
        trees = {r.seq_id: DraftTree(q=[] if r.proposal == "sampled" else None) for r in requests}
        spine_parent = {r.seq_id: -1 for r in requests}
        depth = 0
        while feed:
            last = self.step(feed)
            depth += 1
            next_feed: dict[str, list[int]] = {}
            for sid, logits in last.items():
                req = by_id[sid]
                token, spine_parent[sid] = self._extend(trees[sid], req, logits, spine_parent[sid], depth)
                if depth < req.k:
                    next_feed[sid] = [token]
            feed = next_feed
        return trees

    def propose(self, seqs: dict[str, list[int]], widths: dict[str, int]) -> dict[str, list[tuple[int, float]]]:
        """One draft position for each sequence: align its row with ``seqs[sid]`` (all its tokens so far), one
        batched forward, and its top-``widths[sid]`` candidates (token, probability) for the next token."""
        feed = self._catch_up([DraftRequest(sid, toks, 1) for sid, toks in seqs.items()])
        out: dict[str, list[tuple[int, float]]] = {}
        for sid, logits in self.step(feed).items():
            probs = torch.softmax(logits.float(), dim=-1)
            top = torch.topk(probs, min(widths.get(sid, 1), probs.shape[-1]))
            out[sid] = list(zip(top.indices.tolist(), top.values.tolist()))
        return out

    def step(self, feed: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """One batched forward that feeds and commits each row's tokens in ``feed`` (rows not in it get
        nothing); returns, per sequence id in row order, the logits after its last fed token."""
        segments = [Segment.chain(feed[sid]) if sid in feed else None for sid in self.runner.row_ids]
        logits = self.runner.forward(segments, logits="last")
        assert logits is not None
        self.runner.commit_segments(segments)
        self.steps += 1
        out: dict[str, torch.Tensor] = {}
        for row, sid in enumerate(self.runner.row_ids):
            if sid in feed:
                self.cached[sid].extend(feed[sid])
                out[sid] = logits[row]
        return out

    def _extend(
        self, tree: DraftTree, req: DraftRequest, logits: torch.Tensor, parent: int, depth: int
    ) -> tuple[int, int]:
        """Add this depth's spine node (and alternatives) under ``parent``; returns the spine token and node."""
        probs = torch.softmax(logits.float(), dim=-1)
        if req.proposal == "sampled":
            params = req.params or SamplingParams()
            q = probabilities(logits, params)
            if req.q_top and req.q_top < q.shape[-1]:
                # Truncate, then sample from exactly what is sent: q stays the true proposal distribution.
                top = torch.topk(q, req.q_top)
                q = torch.zeros_like(q).scatter_(-1, top.indices, top.values)
                q = q / q.sum()
            token = sample_with(q, keyed_uniform(req.seed, req.position + depth - 1, DRAFT))
            node = tree.add(token, parent, float(probs[token]), self.name)
            assert tree.q is not None
            tree.q.append(q.cpu())
            return token, node
        top = torch.topk(probs, min(req.width, probs.shape[-1]))
        tokens, confs = top.indices.tolist(), top.values.tolist()
        # The spine node is the first of this depth's nodes; alternatives follow it.
        spine = tree.add(tokens[0], parent, confs[0], self.name)
        for tok, conf in zip(tokens[1:], confs[1:]):
            tree.add(tok, parent, conf, self.name)
        return tokens[0], spine
