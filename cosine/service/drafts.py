"""The verifier's side of drafting: where a request is drafted (:mod:`cosine.policy.placement`), the draft
jobs it sends (length and drafter models from :class:`~cosine.policy.steering.Steering`) and the drafts that
come back on ``verify:{verifier}``.

A draft is a hint: one built on another committed length (stale), from a worker no longer assigned, or for a
request no longer held is dropped; the request then advances with a plain target step. A *bet* is a draft
the drafter sent unasked for an outcome it guessed; it waits here until a pass decides, and when the request's
sequence ends with the tokens it assumed, it is the next round's draft at once: no job-and-reply round trip
between the pass and the next one (the job still goes out, so the drafter learns the outcome). How long
drafts take to come back (their round trips) sets when a missing one counts as late.
"""

from __future__ import annotations

import collections
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from cosine import defaults
from cosine.broker import Entry, Streams, now_ms
from cosine.engine.tree import DraftTree
from cosine.engine.vocab import TokenizerIdentity
from cosine.keys import VERIFIERS_GROUP
from cosine.policy.placement import Placement
from cosine.policy.steering import Load, Steering
from cosine.protocol import Draft, DraftClose, DraftJob, ProtocolError, decode_entry
from cosine.service.request_state import RequestState
from cosine.service.verifier_metrics import VerifierMetrics

log = logging.getLogger(__name__)


class DraftExchange:
    def __init__(self, streams: Streams, steering: Steering, settings, metrics: VerifierMetrics, vocab: int,
                 room: Callable, identity: TokenizerIdentity | None = None) -> None:
        """``settings``: the verifier's (worker id, tree width, token cap, proposal, fusion across workers,
        draft budget); ``room(seq)``: how many draft positions a sequence can still use; ``identity``: the
        target's tokenizer, which every drafter worker must announce to be used."""
        self.streams = streams
        self.keys = streams.keys
        self.steering = steering
        self.settings = settings
        self.me = settings.worker_id
        self.metrics = metrics
        self.vocab = vocab
        self.room = room
        self.stream = self.keys.verify(self.me)
        self.identity = identity
        self.refused: dict[str, str] = {}  # drafter worker -> why it is not used (told once in the log)
        self.placement = Placement({}, settings.cross_fusion)
        self._placement_at = float("-inf")
        self.rtts: collections.deque[float] = collections.deque(maxlen=64)
        self.consumed: list[bytes] = []  # draft entries to acknowledge with the next write

    # -- drafter workers ------------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> None:
        """Re-read the live drafter workers (at most once per heartbeat interval unless forced)."""
        now = time.monotonic()
        if force or now - self._placement_at > defaults.HEARTBEAT_INTERVAL_S:
            live = self.streams.live_workers("drafter")
            self.placement = Placement.from_heartbeats({w: info for w, info in live.items() if self._fits(w, info)},
                                                       self.settings.cross_fusion)
            self._placement_at = now

    def _fits(self, worker: str, info: dict) -> bool:
        """Whether a drafter worker speaks this target's token ids (its announced tokenizer is the target's);
        an incompatible one is refused with an error naming both, once, and counted."""
        mine = self.identity
        theirs = info.get("tokenizer") or None
        if mine is None or (theirs == mine.fingerprint and int(info.get("tokens", 0)) <= self.vocab):
            return True
        if worker not in self.refused:
            told = f"tokenizer {theirs}, {info.get('tokens', '?')} tokens" if theirs else "no tokenizer announced"
            self.refused[worker] = told
            self.metrics.counters["drafters_refused"] += 1
            log.error("refusing drafter worker %s (models %s; %s): it does not share the tokenizer of target %s "
                      "(%s); requests decode without it", worker, info.get("experts", "?"), told,
                      self.settings.worker_id, mine.describe())
        return False

    def hosted(self) -> set[str]:
        """Every drafter model the live drafter workers host (as of the last look at their heartbeats)."""
        self.refresh()
        return {e for models in self.placement.hosted.values() for e in models}

    def watch(self, active: dict[str, RequestState]) -> None:
        """A request whose drafter worker is gone: look at the live workers again now, not at the next beat."""
        if any(st.drafting.worker is not None and not self.placement.alive(st.drafting.worker)
               for st in active.values()):
            self.refresh(force=True)

    def _place(self, st: RequestState, load: collections.Counter) -> str | None:
        """The request's drafter worker (sticky while it lives)."""
        d, msg = st.drafting, st.msg
        choice = self.placement.drafter_for(d.worker, [msg.drafter] if msg.drafter else msg.drafters, load)
        if choice == d.worker:
            return choice
        if choice is None:
            log.info("request %s lost drafter %s; decoding alone until one is back", st.rid, d.worker)
        elif d.worker is not None:
            log.info("request %s moves from drafter %s to %s", st.rid, d.worker, choice)
            self.metrics.counters["drafter_moves"] += 1
        d.worker, d.known = choice, 0
        return choice

    def _lead(self, pipe, st: RequestState, experts: list[str], load: collections.Counter) -> str | None:
        """Fusion across workers: the worker leading the request's lockstep (the old lead is told to let go)."""
        d = st.drafting
        lead = self.placement.lead_for(d.worker, experts, load)
        if lead != d.worker:
            self.streams.add(self.keys.draft(d.worker), DraftClose(st.rid), pipe)  # type: ignore[arg-type]
            log.info("request %s: lead drafter moves from %s to %s (hosts %s)", st.rid, d.worker, lead, experts[0])
            self.metrics.counters["drafter_moves"] += 1
            d.worker, d.known = lead, 0
        return lead

    # -- jobs -----------------------------------------------------------------------------------------
    def queue_jobs(self, pipe, sts: list[RequestState], active: dict[str, RequestState],
                   load: Load) -> list[tuple[RequestState, int]]:
        """Queue the next draft job of each request (length and drafter models from steering, a live drafter
        worker); a request given 0 positions takes a plain target step. Returns (request, epoch) pairs."""
        s = self.settings
        self.refresh()
        rooms = {st.rid: self.room(st.seq) for st in sts}
        ahead = frozenset(st.rid for st in sts if st.drafting.draft is not None)  # a bet in hand (settle_bets)
        ks = {st.rid: self.steering.k_for(st.drafting.steer, st.msg.speculation, st.msg.spec_k, rooms[st.rid], load,
                                          st.rid in ahead) for st in sts}
        adaptive = {st.rid: (st.drafting.steer, rooms[st.rid]) for st in sts
                    if self.steering.adapts(st.msg.speculation)}
        ks = self.steering.cap(ks, s.tree_width, s.max_batch_tokens, load, adaptive, ahead)
        workers = collections.Counter(st.drafting.worker for st in active.values())
        jobs = []
        for st in sts:
            d, k = st.drafting, ks[st.rid]
            worker = self._place(st, workers) if k > 0 else None
            d.plain = worker is None
            if d.plain:
                d.draft = None  # a bet in hand is not verified in a plain step
                self.metrics.counters["plain_steps"] += 1
                continue
            if d.draft is not None:
                d.draft = truncated(d.draft, k)  # a bet drafted deeper than the round gets
            self.metrics.counters["draft_jobs"] += 1
            self.metrics.counters["draft_positions"] += k
            experts, weights = self.steering.experts_for(d.steer, self.placement.pool(worker), st.msg.drafter,
                                                         st.msg.drafters, load.control)
            sampled = s.proposal == "sampled" and not st.seq.params.greedy
            peers: dict[str, str] = {}
            if s.cross_fusion and experts and not sampled:
                worker = self._lead(pipe, st, experts, workers)
                asked = collections.Counter(w for other in active.values() for w in other.drafting.peers.values())
                experts, weights, peers = self.placement.peers_for(worker, experts, weights, d.peers, asked)
                d.peers = peers
            d.k = k
            tokens = st.seq.tokens
            epoch = len(tokens)
            base = d.known if 0 < d.known <= epoch - 1 else 0
            job = DraftJob(st.rid, self.me, epoch, base, tokens[base:], k, s.tree_width, experts=experts,
                           expert_weights=weights, peers=peers, sent_ms=now_ms())
            if sampled:
                job.width, job.q_top, job.position = 1, s.q_top, len(st.seq.output_ids)
                job.params = replace(st.seq.params, seed=st.seq.seed)
            self.streams.add(self.keys.draft(worker), job, pipe)  # type: ignore[arg-type]
            jobs.append((st, epoch))
        return jobs

    @staticmethod
    def sent(jobs: list[tuple[RequestState, int]]) -> None:
        """The queued jobs went out: their requests wait for drafts built on ``epoch`` tokens."""
        now = time.monotonic()
        for st, epoch in jobs:
            st.drafting.waiting_epoch = st.drafting.known = epoch
            st.drafting.job_sent = now

    def dispatch(self, sts: list[RequestState], active: dict[str, RequestState], load: Load) -> None:
        """Send these requests' next jobs now (outside a verification pass's write)."""
        pipe = self.streams.pipeline()
        jobs = self.queue_jobs(pipe, sts, active, load)
        if len(pipe):
            pipe.execute()
        self.sent(jobs)

    # -- drafts ---------------------------------------------------------------------------------------
    def absorb(self, entries: list[Entry], active: dict[str, RequestState]) -> None:
        """Take the drafts that arrived: each goes to its request if it is the one awaited."""
        wall = now_ms()
        for eid, fields in entries:
            try:
                msg = decode_entry(fields, (Draft,), self.vocab)
            except ProtocolError as exc:
                self.streams.dead_letter(self.stream, VERIFIERS_GROUP, eid, fields, exc.reason, self.me)
                self.metrics.counters["dead_lettered"] += 1
                continue
            self.consumed.append(eid)
            if msg.job_sent_ms:  # late or not, every reply tells how long drafting round trips take
                self.rtts.append(max(0.0, wall - msg.job_sent_ms))
            st = active.get(msg.request_id)
            d = st.drafting if st is not None else None
            if msg.assumed and d is not None and msg.drafter == d.worker and msg.epoch > len(st.seq):
                d.bets = [b for b in d.bets if b.epoch >= len(st.seq)][-MAX_BETS + 1:] + [msg]
                continue
            if msg.assumed and d is not None and msg.drafter == d.worker and msg.epoch == len(st.seq):
                if d.plain or d.waiting_epoch != len(st.seq) or not self._take_bet(st, msg, d.k):
                    self.metrics.counters["stale_drafts"] += 1
                continue
            if d is None or msg.drafter != d.worker or msg.epoch != len(st.seq) or d.draft is not None:
                self.metrics.counters["stale_drafts"] += 1
                if st is not None:
                    st.counters.stale += 1
                continue
            if msg.resync:  # the worker lost the request's tokens: the next job sends them all
                d.known, d.waiting_epoch = 0, None
                st.counters.resyncs += 1
                self.metrics.counters["resyncs"] += 1
                continue
            self.steering.learn_feature(d.steer, msg.feature, self.placement.pool(d.worker))
            if msg.lookahead:
                st.counters.lookahead_hits += 1
                self.metrics.counters["lookahead_hits"] += 1
            d.draft = msg

    def settle_bets(self, sts: list[RequestState]) -> None:
        """After a pass, before the next jobs are queued: each request takes the bet that assumed what was
        committed (:meth:`queue_jobs` then cuts it to the positions steering gives the round)."""
        for st in sts:
            d = st.drafting
            bets, d.bets = [b for b in d.bets if b.epoch >= len(st.seq)], []
            for bet in bets:
                if bet.epoch > len(st.seq):
                    d.bets.append(bet)
                elif self._take_bet(st, bet):
                    break

    def _take_bet(self, st: RequestState, bet: Draft, k: int | None = None) -> bool:
        """Take ``bet`` as the draft for the request's current epoch if it assumed the committed tokens (cut to
        ``k`` positions when the round's job is out already)."""
        d, tokens = st.drafting, st.seq.tokens
        if d.draft is not None or bet.drafter != d.worker or tokens[len(tokens) - len(bet.assumed):] != bet.assumed:
            return False
        d.draft = bet if k is None else truncated(bet, k)
        self.metrics.counters["bets_taken"] += 1
        self.metrics.counters["lookahead_hits"] += 1
        st.counters.lookahead_hits += 1
        return True

    def ack_consumed(self, pipe) -> None:
        """Queue the acknowledgement of every draft taken since the last write."""
        Streams.ack_delete(pipe, self.stream, VERIFIERS_GROUP, self.consumed)
        self.consumed = []

    # -- round trips ----------------------------------------------------------------------------------
    def budget_ms(self) -> float:
        """How long a draft may take before its request goes on without it: a factor of the recent p90
        round trip, within the settings' bounds."""
        s = self.settings
        if len(self.rtts) < 4:
            return max(s.draft_budget_min_ms, min(s.draft_budget_max_ms, 500.0))
        ordered = sorted(self.rtts)
        p90 = ordered[int(0.9 * (len(ordered) - 1))]
        return max(s.draft_budget_min_ms, min(s.draft_budget_max_ms, s.draft_budget_factor * p90))

    def eta_ms(self) -> float:
        """When a draft is expected after its job was sent: the median recent round trip."""
        return statistics.median_high(self.rtts) if self.rtts else 0.0

    def info(self) -> dict:
        return {"draft_budget_ms": round(self.budget_ms(), 2),
                "draft_rtt_p50_ms": round(statistics.median(self.rtts), 2) if self.rtts else 0.0}


MAX_BETS = 8  # bets kept per request (a drafter sends a few per round)


def truncated(draft: Draft, k: int) -> Draft:
    """``draft`` without its nodes deeper than ``k`` (a bet drafted deeper than the round asks for)."""
    depths: list[int] = []
    for p in draft.parents:
        depths.append(0 if p < 0 else depths[p] + 1)
    if not depths or max(depths) < k:
        return draft
    keep = [i for i, dep in enumerate(depths) if dep < k]
    index = {old: new for new, old in enumerate(keep)}
    return replace(draft, tokens=[draft.tokens[i] for i in keep],
                   parents=[-1 if draft.parents[i] < 0 else index[draft.parents[i]] for i in keep],
                   confidences=[draft.confidences[i] for i in keep], sources=[draft.sources[i] for i in keep],
                   votes={e: v[:k] for e, v in draft.votes.items()},
                   vote_conf={e: c[:k] for e, c in draft.vote_conf.items()})


def tree_of(draft: Draft, vocab: int) -> DraftTree:
    """The engine's tree for a draft off the wire (sampled drafts: their sparse proposal distributions made
    dense over the vocabulary)."""
    tree = DraftTree(list(draft.tokens), list(draft.parents), list(draft.confidences), list(draft.sources))
    if draft.q_ids:
        tree.q = []
        for ids, probs in zip(draft.q_ids, draft.q_probs):
            q = torch.zeros(vocab)
            q[torch.tensor(ids)] = torch.tensor(probs)
            tree.q.append(q / q.sum())
    return tree
