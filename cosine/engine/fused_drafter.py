"""FusedDrafter: several expert drafters drafting in lockstep, fused into one token tree.

Each expert keeps its own KV rows (a :class:`Drafter`). Per depth, each expert aligns the rows of the
requests that use it with their tokens so far (committed tokens plus the spine drafted so far), runs one
batched forward and offers its top-``width`` candidates. :func:`fuse_position` picks the spine (the most
confident top-1 candidate), which extends the tree and every expert's next input, so they keep drafting
from the same prefix; the candidates they disagreed on become sibling leaves of the spine node. With one
expert this is exactly :meth:`Drafter.draft` with the same width.

Experts may live in other processes (fusion across drafter workers): a request may name experts this
process does not host, and a :class:`RemoteExperts` asks for their candidates per depth. The remote asks
go out before the local forwards and are collected after them, so the network round trip overlaps the
local work; an expert whose candidates do not come back in time drops out of that draft (the tree is then
built from the others: a weaker draft, never a wrong output).

The experts' top-1 tokens at every depth (their *votes*) and confidences come back with the tree, so the
caller can score each expert's agreement with what the target then commits (expertise routing), and so does
each depth's *runners-up*: the likeliest candidates the tree does not hold (each local expert offers
``RUNNERS_UP`` candidates more than the tree's width), the drafter's guesses for the target's token should
it reject that depth (what drafting ahead bets on).
Sampled proposals are not fused: the caller drafts those with a single :class:`Drafter`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

from cosine.engine.draft_model import Drafter
from cosine.engine.tree import DraftTree
from cosine.policy.fusion import fuse_position

log = logging.getLogger(__name__)

RUNNERS_UP = 2  # candidates per depth beyond the tree's, kept for bets on a rejection there


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
    # Per depth: the likeliest candidates not in the tree there, (token, probability), best first.
    runners_up: list[list[tuple[int, float]]] = field(default_factory=list)

    def truncated(self, depth: int) -> FusedDraft:
        """The draft cut to its first ``depth`` positions (tree, votes and their confidences)."""
        return FusedDraft(self.tree.truncated(depth), {e: v[:depth] for e, v in self.votes.items()},
                          {e: c[:depth] for e, c in self.vote_confidence.items()}, self.runners_up[:depth])

    def below_first(self) -> FusedDraft:
        """The draft below its first spine node, one depth shorter (drafted from a guess of the token there)."""
        return FusedDraft(self.tree.below(self.tree.spine()[0]), {e: v[1:] for e, v in self.votes.items()},
                          {e: c[1:] for e, c in self.vote_confidence.items()}, self.runners_up[1:])


class RemoteExperts(Protocol):
    """Candidates from experts hosted elsewhere, one depth at a time (see ``cosine.service.cross_fusion``)."""

    def ask(self, asks: dict[str, dict[str, list[int]]], widths: dict[str, int]) -> None:
        """Ask, per expert, for the next-token candidates of each sequence (``asks[expert][seq_id]`` = its
        tokens so far); must not wait for the answers."""

    def collect(self) -> dict[str, dict[str, list[tuple[int, float]]]]:
        """The answers to the last :meth:`ask`: expert -> seq_id -> candidates, best first; what did not come
        back in time is missing."""


class FusedDrafter:
    def __init__(self, drafters: dict[str, Drafter], lock: AbstractContextManager | None = None) -> None:
        """``lock`` guards the experts' KV rows when another thread (a server of remote asks) uses them too."""
        self.drafters = drafters
        self.lock = lock or nullcontext()

    def release(self, seq_ids: list[str]) -> None:
        with self.lock:
            for d in self.drafters.values():
                d.release(seq_ids)

    def _check(self, req: FusedRequest, remote: bool) -> None:
        if not req.experts:
            raise ValueError(f"{req.seq_id}: a fused request needs at least one expert")
        unknown = [e for e in req.experts if e not in self.drafters]
        if unknown and not remote:
            raise ValueError(f"{req.seq_id}: unknown experts {unknown}; have {sorted(self.drafters)}")
        if req.width < 1:
            raise ValueError(f"{req.seq_id}: width must be >= 1, got {req.width}")

    def draft(self, requests: list[FusedRequest], remote: RemoteExperts | None = None,
              stop: Callable[[], bool] | None = None) -> dict[str, FusedDraft]:
        """Draft every request with its experts: per depth one forward per local expert (and one ask per
        remote one); a fused tree per sequence. ``stop`` is asked before every forward after the first
        depth: when it says so, the trees end at the last depth completed (drafting ahead gives way to a job
        that came in after one expert's forward at most, not after every expert's)."""
        requests = [r for r in requests if r.k > 0]
        for r in requests:
            self._check(r, remote is not None)
        if not requests:
            return {}
        tokens = {r.seq_id: list(r.tokens) for r in requests}  # committed tokens plus the spine so far
        live = {r.seq_id: list(r.experts) for r in requests}  # the experts still drafting each request
        widths = {r.seq_id: r.width for r in requests}
        out = {
            r.seq_id: FusedDraft(DraftTree(), {e: [] for e in r.experts}, {e: [] for e in r.experts})
            for r in requests
        }
        spine_parent = {r.seq_id: -1 for r in requests}
        for depth in range(1, max(r.k for r in requests) + 1):
            now = [r for r in requests if r.k >= depth and live[r.seq_id]]
            if not now:
                break
            local: dict[str, dict[str, list[int]]] = {}
            asks: dict[str, dict[str, list[int]]] = {}
            for r in now:
                for e in live[r.seq_id]:
                    (local if e in self.drafters else asks).setdefault(e, {})[r.seq_id] = tokens[r.seq_id]
            if asks:
                assert remote is not None
                remote.ask(asks, widths)
            # candidates[sid][e]: expert e's top-width (token, prob) for sequence sid at this depth.
            candidates: dict[str, dict[str, list[tuple[int, float]]]] = {}
            stopped = False
            for e, seqs in local.items():
                if depth > 1 and stop is not None and stop():
                    stopped = True  # a depth some experts did not draft is dropped (their rows catch up later)
                    break
                with self.lock:  # more candidates than the tree takes: the runners-up
                    proposed = self.drafters[e].propose(seqs, {sid: widths[sid] + RUNNERS_UP for sid in seqs})
                for sid, c in proposed.items():
                    candidates.setdefault(sid, {})[e] = c
            if stopped:
                if asks:
                    assert remote is not None
                    remote.collect()  # this depth's answers are not used
                break
            if asks:
                assert remote is not None
                answers = remote.collect()
                for e, seqs in asks.items():
                    for sid in seqs:
                        c = answers.get(e, {}).get(sid)
                        if c:
                            candidates.setdefault(sid, {})[e] = c
                        else:  # no answer in time: out of this draft, so its votes stay aligned by depth
                            live[sid].remove(e)
            for r in now:
                sid = r.seq_id
                cands = candidates.get(sid)
                if not cands:
                    live[sid] = []
                    continue
                draft = out[sid]
                cap = r.max_alternatives if r.max_alternatives is not None else len(r.experts) * r.width - 1
                ranked = {e: [(t, p * r.weights.get(e, 1.0)) for t, p in c] for e, c in cands.items()} \
                    if r.weights else cands
                fused = fuse_position({e: c[: r.width] for e, c in ranked.items()}, cap)
                in_tree = {fused.spine_token, *(tok for tok, _, _ in fused.alternatives)}
                spare: dict[int, float] = {}
                for t, p in (tp for c in ranked.values() for tp in c):
                    if t not in in_tree and p > spare.get(t, -1.0):
                        spare[t] = p
                draft.runners_up.append(sorted(spare.items(), key=lambda tp: -tp[1])[:RUNNERS_UP])
                for e, c in cands.items():
                    draft.votes[e].append(c[0][0])
                    draft.vote_confidence[e].append(c[0][1])
                parent = spine_parent[sid]
                spine_parent[sid] = draft.tree.add(fused.spine_token, parent, fused.spine_confidence,
                                                   fused.spine_source)
                for tok, conf, src in fused.alternatives:
                    draft.tree.add(tok, parent, conf, src)
                tokens[sid].append(fused.spine_token)
        return out
