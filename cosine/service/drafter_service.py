"""The drafter service: consume this worker's draft-job stream in batches, draft, reply to verifiers.

One worker hosts one or more drafter models (experts). A job names the experts to draft with (the
verifier's router decides); several draft in lockstep with token fusion (one reply, a spine plus
alternatives). Per request the worker keeps the committed tokens it was told (jobs carry only the tokens
after ``base``; one it cannot honour is answered with ``resync``) and the request's prompt feature (the
expert with the lowest loss on the prompt's tail), which replies carry for the router's prior.

Lookahead: with nothing else queued, the worker drafts each request's next round right after replying, for
the outcomes of the pass it expects (:mod:`cosine.policy.bets`: the whole draft accepted with its own guess of
the bonus token, and the likeliest rejections at a depth with a runner-up there; a drafter row each, in one
batched drafting) and sends each as a *bet* to the verifier at once; the verifier takes the one whose assumed
tokens its pass commits, without waiting for a job round trip, and this worker then answers the job that
confirms it with nothing. A job arriving meanwhile ends drafting ahead at the next depth: a job must not wait for bets.

With fusion across drafter workers a job may name experts hosted elsewhere (``peers``): this worker leads the
lockstep and asks them per depth, and answers other leads from a thread of its own
(:mod:`cosine.service.cross_fusion`). Replies and the acknowledgement of their jobs go out in one MULTI; a
failure while drafting answers with empty drafts (the verifier then decodes alone), never kills the worker.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cosine import defaults
from cosine.broker import RedisSettings, Streams, connect
from cosine.engine.draft_model import Drafter, DraftRequest, common_prefix
from cosine.engine.fused_drafter import FusedDraft, FusedDrafter, FusedRequest
from cosine.engine.models import describe_memory
from cosine.engine.prompt_scoring import best_by_prompt_loss
from cosine.engine.vocab import TokenizerIdentity
from cosine.keys import DRAFTERS_GROUP, Keys
from cosine.policy.bets import Outcome, choose, outcomes
from cosine.protocol import Draft, DraftClose, DraftJob, ProtocolError, decode_entry
from cosine.service.cross_fusion import RedisRemoteExperts, VoteServer
from cosine.service.heartbeat import Heartbeat
from cosine.service.run_loop import run_forever

log = logging.getLogger(__name__)


@dataclass
class DrafterSettings:
    worker_id: str
    batch_max: int = defaults.DRAFTER_BATCH_MAX
    window_ms: float = defaults.DRAFTER_WINDOW_MS
    block_ms: int = defaults.DRAFTER_BLOCK_MS
    idle_evict_s: float = defaults.DRAFTER_IDLE_EVICT_S
    lookahead: bool = defaults.DRAFTER_LOOKAHEAD
    ahead_rows: int = defaults.DRAFTER_AHEAD_ROWS
    ahead_depth: int = defaults.DRAFTER_AHEAD_DEPTH
    vote_timeout_ms: float = defaults.VOTE_TIMEOUT_MS


@dataclass
class _Ahead:
    """A bet sent to the verifier: the draft for the round after the one just sent, if that round commits
    ``expected``."""

    expected: list[int]  # the committed tokens it assumes
    draft: FusedDraft
    base: int  # the committed tokens the drafter had been sent when it bet
    depth: int  # the depth whose rejection it bets on (0: the whole draft accepted)


@dataclass
class _Drafted:
    """What this worker keeps per request it drafts for."""

    tokens: list[int]
    feature: str = ""  # the expert with the lowest loss on the prompt's tail
    experts: list[str] = field(default_factory=list)
    weights: dict[str, float] | None = None  # trust per expert when several draft together
    peers: dict[str, str] = field(default_factory=dict)  # expert hosted elsewhere -> the worker hosting it
    seen: float = 0.0
    ahead: list[_Ahead] = field(default_factory=list)  # bets sent for the round after the last job
    rows: set[str] = field(default_factory=set)  # drafter rows of its bets on rejections (besides its own)


class DrafterService:
    def __init__(self, redis_settings: RedisSettings, settings: DrafterSettings, drafters: dict[str, Drafter],
                 vocab_size: int, fused: FusedDrafter | None = None,
                 features: Callable[[list[list[int]]], list[str]] | None = None,
                 identity: TokenizerIdentity | None = None) -> None:
        """``drafters`` are the expert models; ``fused`` drafts with them in lockstep and ``features``
        names, per prompt, the expert whose loss on its tail is lowest (both derived from ``drafters``
        unless given, e.g. by the cluster simulation); ``identity``: their tokenizer, announced in the
        heartbeat so that verifiers can check it against their target's."""
        self.settings = settings
        self.keys = Keys(redis_settings.prefix)
        self.streams = Streams(connect(redis_settings), self.keys)
        self.drafters = drafters
        self.lock = threading.Lock()  # the experts' KV rows: this thread's forwards vs the vote server's
        self.fused = fused or FusedDrafter(drafters, self.lock)
        self.features = features or (lambda prompts: best_by_prompt_loss(
            {n: d.runner.model for n, d in drafters.items()}, prompts))
        self.vocab = vocab_size
        self.identity = identity
        # Each expert's parameter memory by device, announced in the heartbeat ("" when drafts are simulated).
        self.memory = describe_memory({n: d.runner.model for n, d in drafters.items()})
        self.stream = self.keys.draft(settings.worker_id)
        self.requests: dict[str, _Drafted] = {}
        self._last_draft: dict[str, FusedDraft] = {}  # the draft last sent per request (for lookahead)
        self.started = time.monotonic()
        # Time answering jobs; drafting ahead is kept apart: it runs only when no job waits, so counting it
        # made a drafter with nothing queued look saturated to the controller, which then cut k_max and the
        # cooperating drafters ("drafts pile up" at 0 jobs waiting, busy 0.94).
        self.busy_s = 0.0
        self.lookahead_s = 0.0
        self.jobs = 0
        self.batches = 0
        self.resyncs = 0
        self.lookahead_hits = 0
        self.lookahead_misses = 0
        self.bets_sent = 0
        self.missed: collections.Counter[str] = collections.Counter()  # lookahead misses by kind (_miss_kind)
        self.heartbeat = Heartbeat(Streams(connect(redis_settings), self.keys), settings.worker_id, self.info)
        self.remote = RedisRemoteExperts(self.streams, settings.worker_id, vocab_size, settings.vote_timeout_ms)
        # Answers other leads' asks with this worker's models (none to offer when its drafts are simulated).
        self.vote_server = VoteServer(redis_settings, settings.worker_id, drafters, self.lock, vocab_size,
                                      settings.idle_evict_s) if drafters else None

    def info(self) -> dict:
        up = max(time.monotonic() - self.started, 1e-9)
        return {
            "role": "drafter",
            "experts": ",".join(sorted(self.fused.drafters)),
            **({"tokenizer": self.identity.fingerprint, "tokens": self.identity.tokens} if self.identity else {}),
            **({"memory": self.memory} if self.memory else {}),
            "active": len(self.requests),
            "jobs": self.jobs,
            "batches": self.batches,
            "resyncs": self.resyncs,
            "lookahead_hits": self.lookahead_hits,
            "lookahead_misses": self.lookahead_misses,
            "bets_sent": self.bets_sent,
            **{f"lookahead_missed_{kind}": n for kind, n in self.missed.items()},
            "busy": round(self.busy_s / up, 4),
            "busy_s": round(self.busy_s, 4),
            "lookahead_s": round(self.lookahead_s, 4),
            "votes_served": self.vote_server.served if self.vote_server else 0,
            **self.remote.stats(),
            "pid": os.getpid(),
        }

    # -- loop -----------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        if self.vote_server is not None:
            self.vote_server.start()
        log.info("drafter %s serving experts %s on %s", self.settings.worker_id, sorted(self.fused.drafters),
                 self.stream)
        run_forever(f"drafter {self.settings.worker_id}", stop, self.step, on_start=self.recover_own,
                    on_stop=self._stopped, heartbeat=self.heartbeat)

    def _stopped(self) -> None:
        if self.vote_server is not None:
            self.vote_server.stop()
        log.info("drafter %s stopped", self.settings.worker_id)

    def recover_own(self) -> None:
        """At start (and after Redis lost its groups): create the group, answer jobs this worker had read."""
        self.streams.forget_groups()
        self.streams.ensure_group(self.stream, DRAFTERS_GROUP)
        self.handle(self.streams.own_pending(self.stream, DRAFTERS_GROUP, self.settings.worker_id))

    def step(self) -> None:
        """One batch of jobs (waiting up to ``block_ms`` for the first), then idle requests evicted."""
        s = self.settings
        batch = self.streams.read_batch(self.stream, DRAFTERS_GROUP, s.worker_id, s.batch_max, s.window_ms, s.block_ms)
        if batch:
            self.handle(batch)
        self.evict_idle()

    def handle(self, entries: list) -> None:
        """Draft for a batch of stream entries and reply, acknowledging them with the replies."""
        if not entries:
            return
        t0 = time.perf_counter()
        latest: dict[str, DraftJob] = {}
        done_ids = []
        for eid, fields in entries:
            try:
                msg = decode_entry(fields, (DraftJob, DraftClose), self.vocab)
            except ProtocolError as exc:
                self.streams.dead_letter(self.stream, DRAFTERS_GROUP, eid, fields, exc.reason,
                                         self.settings.worker_id)
                continue
            done_ids.append(eid)
            if isinstance(msg, DraftClose):
                self.release(msg.request_id)
                latest.pop(msg.request_id, None)
            elif msg.request_id not in latest or msg.epoch >= latest[msg.request_id].epoch:
                latest[msg.request_id] = msg  # an older job for the same request is stale
        replies = self.draft_all(list(latest.values()))
        elapsed_ms = (time.perf_counter() - t0) * 1000
        pipe = self.streams.transaction()
        for job, reply in replies:
            if reply is None:  # confirms a bet the verifier holds: nothing to send
                continue
            reply.draft_ms = round(elapsed_ms, 3)
            self.streams.add(self.keys.verify(job.verifier), reply, pipe)
        Streams.ack_delete(pipe, self.stream, DRAFTERS_GROUP, done_ids)
        pipe.execute()
        self.jobs += len(latest)
        self.batches += 1
        t1 = time.perf_counter()
        self.busy_s += t1 - t0
        if self.settings.lookahead and replies and not self.jobs_waiting():
            self.look_ahead([job for job, reply in replies if reply is None or (reply.tokens and not reply.q_ids)])
            self.lookahead_s += time.perf_counter() - t1

    def draft_all(self, jobs: list[DraftJob]) -> list[tuple[DraftJob, Draft | None]]:
        """A reply per job; ``None`` for a job that confirms a bet the verifier took."""
        replies: list[tuple[DraftJob, Draft | None]] = []
        runnable: list[tuple[DraftJob, list[int]]] = []
        for job in jobs:
            tokens = self._sequence(job)
            if tokens is None:
                self.resyncs += 1
                replies.append((job, self._reply(job, resync=True)))
            else:
                runnable.append((job, tokens))
        self._learn_features([(job.request_id, toks) for job, toks in runnable])
        fused: list[tuple[DraftJob, FusedRequest]] = []
        for job, toks in runnable:
            known = self.requests[job.request_id]
            hosted = [(e, w) for e, w in zip(job.experts, job.expert_weights or [1.0] * len(job.experts))
                      if e in self.fused.drafters or e in job.peers]
            known.experts = [e for e, _ in hosted] or [known.feature]
            known.weights = dict(hosted) if len(hosted) > 1 else None
            known.peers = {e: job.peers[e] for e in known.experts if e not in self.fused.drafters}
            bets, known.ahead = known.ahead, []
            hit = next((b for b in bets if b.expected == toks), None) if not job.sampled else None
            if hit is not None:
                # The job confirms a bet sent ahead, which the verifier took when its pass committed it.
                self.lookahead_hits += 1
                self._last_draft[job.request_id] = hit.draft
                replies.append((job, None))
                continue
            if bets:
                self.lookahead_misses += 1
                self.missed[_miss_kind(bets, toks)] += 1
            if job.sampled:
                local = [e for e in known.experts if e in self.fused.drafters]
                replies.append((job, self._sampled(job, toks, local[0] if local else known.feature)))
            else:
                fused.append((job, FusedRequest(job.request_id, toks, job.k, known.experts, job.width,
                                                weights=known.weights)))
        if fused:
            peers = {job.request_id: self.requests[job.request_id].peers for job, _ in fused}
            try:
                if any(peers.values()):
                    self.remote.route(peers)
                    drafts = self.fused.draft([req for _, req in fused], remote=self.remote)
                else:
                    drafts = self.fused.draft([req for _, req in fused])
            except Exception:  # a drafting failure must cost speed, never the worker
                log.exception("drafting failed for %d requests; replying with empty drafts", len(fused))
                self.fused.release([req.seq_id for _, req in fused])
                drafts = {}
            for job, req in fused:
                reply = self._reply(job)
                d = drafts.get(req.seq_id)
                if d is not None:
                    self._fill(reply, d)
                replies.append((job, reply))
        return replies

    def jobs_waiting(self) -> bool:
        """Whether a job is queued for this worker (drafting ahead gives way to it)."""
        return bool(self.streams.r.xlen(self.stream))

    def look_ahead(self, jobs: list[DraftJob]) -> None:
        """Draft the round after each just-answered job for the outcomes expected of its pass, and send each
        to the job's verifier as a bet: the whole draft accepted (the request's own row) and the likeliest
        rejections (a row each) within ``ahead_rows`` rows in all."""
        plans: dict[str, tuple[DraftJob, _Drafted, list[str]]] = {}
        found: dict[str, list[Outcome]] = {}
        for job in jobs:
            known = self.requests.get(job.request_id)
            last = self._last_draft.get(job.request_id)
            if known is None or known.ahead or last is None:
                continue
            local = [e for e in known.experts if e in self.fused.drafters]  # no round trips ahead of time
            spine_nodes = last.tree.spine()[: job.k]  # a bet deeper than k was cut to k
            if not local or not spine_nodes:
                continue
            spine = [last.tree.tokens[i] for i in spine_nodes]
            confs = [last.tree.confidences[i] for i in spine_nodes]
            plans[job.request_id] = (job, known, local)
            found[job.request_id] = outcomes(spine, confs, last.runners_up)
        # One batched drafting: the whole draft's row one position deeper (its first position is the guess of
        # the bonus token), the others ``ahead_depth`` deep, so that all of them are in before the pass ends
        # (drafted one after the other, the rejections were mostly cut short by the next job).
        chosen = choose(found, self.settings.ahead_rows)
        self._bet([(rid, o, 1 if o.depth == 0 else 0, None if o.depth == 0 else self.settings.ahead_depth)
                   for rid, outs in chosen.items() for o in outs], plans)

    def _bet(self, outs: list[tuple[str, Outcome, int, int | None]], plans: dict) -> None:
        """Draft the round after each outcome ``(request, outcome, guessed, depth)`` (a drafter row each: the
        request's own for its whole-draft outcome; ``depth`` at most, else the job's k) and send each draft as
        a bet; the first ``guessed`` positions drafted are guesses of tokens the outcome commits."""
        reqs: list[FusedRequest] = []
        for n, (rid, o, guessed, cap) in enumerate(outs):
            job, known, local = plans[rid]
            row = rid if o.depth == 0 else f"{rid}#{sum(1 for r, *_ in outs[:n] if r == rid)}"
            known.rows.add(row)
            depth = job.k if cap is None else min(job.k, cap)
            reqs.append(FusedRequest(row, known.tokens + list(o.assumed), depth + guessed, local, job.width,
                                     weights=known.weights))
        if not reqs:
            return
        try:  # a job arriving meanwhile ends drafting ahead at the next depth: it must not wait for all of it
            drafts = self.fused.draft(reqs, stop=self.jobs_waiting)
        except Exception:
            log.exception("lookahead drafting failed for %d rows", len(reqs))
            self.fused.release([req.seq_id for req in reqs])
            return
        pipe = self.streams.pipeline()
        for req, (rid, o, guessed, _) in zip(reqs, outs):
            d = drafts.get(req.seq_id)
            known = self.requests.get(rid)
            if d is None or not d.tree.tokens or known is None:
                continue
            expected = list(req.tokens)
            for _ in range(guessed):
                expected.append(d.tree.tokens[d.tree.spine()[0]])
                d = d.below_first()
            if not d.tree.tokens:  # stopped after the guesses: nothing drafted ahead
                continue
            known.ahead.append(_Ahead(expected, d, len(known.tokens), o.depth))
            bet = Draft(rid, self.settings.worker_id, len(expected), feature=known.feature,
                        assumed=expected[len(known.tokens):])
            self.streams.add(self.keys.verify(plans[rid][0].verifier), self._fill(bet, d, lookahead=True, keep=False),
                             pipe)
            self.bets_sent += 1
        if len(pipe):
            pipe.execute()

    def _fill(self, reply: Draft, d: FusedDraft, lookahead: bool = False, keep: bool = True) -> Draft:
        """``reply`` carrying draft ``d`` (kept as the request's last draft unless it is only a bet)."""
        tree = d.tree
        reply.tokens, reply.parents = tree.tokens, tree.parents
        reply.confidences = [min(1.0, max(0.0, c)) for c in tree.confidences]
        reply.sources = list(tree.sources)
        reply.votes = {e: list(v) for e, v in d.votes.items()}
        reply.vote_conf = {e: [min(1.0, max(0.0, c)) for c in v] for e, v in d.vote_confidence.items()}
        reply.lookahead = lookahead
        if keep:
            self._last_draft[reply.request_id] = d
        return reply

    def _sampled(self, job: DraftJob, tokens: list[int], expert: str) -> Draft:
        """A draft sampled from one expert, with the proposal distributions for rejection sampling."""
        reply = self._reply(job)
        drafter = self.drafters.get(expert)
        if drafter is None:  # no model to sample from (e.g. simulated experts): the verifier decodes alone
            return reply
        try:
            with self.lock:
                tree = drafter.draft([DraftRequest(job.request_id, tokens, job.k, 1, job.params, job.params.seed,
                                                   job.position, "sampled", job.q_top)]).get(job.request_id)
        except Exception:
            log.exception("sampled drafting failed for %s on %s; replying with an empty draft", job.request_id, expert)
            with self.lock:
                drafter.release([job.request_id])
            return reply
        if tree is not None:
            reply.tokens, reply.parents = tree.tokens, tree.parents
            reply.confidences = [min(1.0, max(0.0, c)) for c in tree.confidences]
            reply.sources = list(tree.sources)
            for q in tree.q or []:  # send the (truncated) proposal distributions, sparse
                nz = torch.nonzero(q, as_tuple=False).flatten()
                reply.q_ids.append(nz.tolist())
                reply.q_probs.append([min(1.0, float(v)) for v in q[nz]])
        return reply

    def _learn_features(self, seqs: list[tuple[str, list[int]]]) -> None:
        """New requests: which expert has the lowest loss on the prompt's tail (one forward per expert)."""
        new = [(rid, toks) for rid, toks in seqs if not self.requests[rid].feature]
        if new:
            chosen = self.features([t for _, t in new])
            for (rid, _), name in zip(new, chosen):
                self.requests[rid].feature = name

    def _reply(self, job: DraftJob, resync: bool = False) -> Draft:
        known = self.requests.get(job.request_id)
        return Draft(job.request_id, self.settings.worker_id, job.epoch, resync=resync, job_sent_ms=job.sent_ms,
                     feature=known.feature if known is not None and not resync else "")

    def _sequence(self, job: DraftJob) -> list[int] | None:
        """The request's committed tokens, rebuilt from what this worker knows plus the job's tokens."""
        known = self.requests.get(job.request_id)
        if job.base == 0:
            tokens = list(job.tokens)
        elif known is not None and len(known.tokens) >= job.base:
            tokens = known.tokens[: job.base] + list(job.tokens)
        else:
            return None
        if known is None:
            known = self.requests[job.request_id] = _Drafted(tokens)
        known.tokens = tokens
        known.seen = time.monotonic()
        return tokens

    def release(self, request_id: str) -> None:
        known = self.requests.pop(request_id, None)
        self._last_draft.pop(request_id, None)
        self.remote.forget(request_id)
        self.fused.release([request_id, *(known.rows if known is not None else ())])

    def evict_idle(self) -> None:
        cutoff = time.monotonic() - self.settings.idle_evict_s
        for rid in [r for r, k in self.requests.items() if k.seen < cutoff]:
            log.info("evicting idle request %s", rid)
            self.release(rid)


def _miss_kind(bets: list[_Ahead], tokens: list[int]) -> str:
    """Why no bet matched the committed ``tokens``: ``bonus`` (the draft was accepted whole, the bonus token
    guessed wrong), ``alternative`` (rejected at a depth bet on, with another token than the runner-up),
    ``undrafted`` (rejected at a depth no bet covered) or ``other`` (no whole-draft bet to compare with)."""
    whole = next((b for b in bets if b.depth == 0), None)
    if whole is None:
        return "other"
    spine, new = whole.expected[whole.base:-1], tokens[whole.base:]
    if new[: len(spine)] == spine:
        return "bonus"
    rejected = common_prefix(new, spine) + 1
    return "alternative" if any(b.depth == rejected for b in bets) else "undrafted"
