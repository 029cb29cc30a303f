"""The verifier service: owns requests, holds the target's KV state, verifies drafts in batches.

One :meth:`VerifierService.step` is a turn of the loop: upkeep (cancellations, deadlines, ownership, the
reclaim sweep), one read over the request stream and this worker's draft stream (blocking only while
nothing can be verified), admission of a few new requests, then one batched target forward over the requests
the scheduler picks among those whose draft arrived, is late or is not needed, and one MULTI that writes
their output, sends their next draft jobs and acknowledges what was consumed. Its collaborators:
:class:`~cosine.service.requests.RequestBook` (the requests it owns), :class:`~cosine.service.output.
OutputWriter` (their output streams), :class:`~cosine.service.drafts.DraftExchange` (jobs out, drafts in),
:class:`~cosine.service.upkeep.Upkeep` and :class:`~cosine.service.verifier_metrics.VerifierMetrics`.
"""

from __future__ import annotations

import json
import logging
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
import torch

from cosine import defaults
from cosine.broker import Entry, RedisSettings, Streams, connect, wall_ms
from cosine.engine.sequence import FinishReason
from cosine.engine.stopping import apply_stop_strings
from cosine.engine.tree import depth_of
from cosine.engine.vocab import TokenizerIdentity
from cosine.errors import InvalidParameterError
from cosine.keys import VERIFIERS_GROUP, Keys
from cosine.policy.cost_model import CostModel
from cosine.policy.scheduling import Candidate
from cosine.policy.steering import Load, Steering, Switches
from cosine.service.control_view import ControlView
from cosine.service.drafts import DraftExchange, tree_of
from cosine.service.heartbeat import Heartbeat
from cosine.service.output import OutputWriter
from cosine.service.request_state import RequestState
from cosine.service.requests import RequestBook
from cosine.service.run_loop import run_forever
from cosine.service.upkeep import Upkeep
from cosine.service.verifier_metrics import VerifierMetrics

log = logging.getLogger(__name__)

INFLIGHT_SHOWN = 20  # in-flight requests a verifier lists in its heartbeat (its oldest)
DRAFT_READ_COUNT = 256  # drafts taken from this verifier's stream per read


@dataclass
class VerifierSettings:
    worker_id: str
    max_active: int = defaults.VERIFIER_MAX_ACTIVE
    max_batch_tokens: int = defaults.VERIFIER_MAX_BATCH_TOKENS
    admit_per_tick: int = defaults.VERIFIER_ADMIT_PER_TICK
    k: int = defaults.SPEC_K
    tree_width: int = defaults.SPEC_TREE_WIDTH
    # Sampling requests: "onehot" (deterministic drafts; output = the target's own keyed samples, however
    # drafts arrive) or "sampled" (drafts sampled by the drafter, verified by rejection sampling).
    proposal: str = defaults.SAMPLING_PROPOSAL
    q_top: int = defaults.SAMPLED_Q_TOP
    idle_block_ms: int = defaults.VERIFIER_IDLE_BLOCK_MS
    draft_budget_min_ms: float = defaults.DRAFT_BUDGET_MIN_MS
    draft_budget_factor: float = defaults.DRAFT_BUDGET_FACTOR
    draft_budget_max_ms: float = defaults.DRAFT_BUDGET_MAX_MS
    admission_refresh_s: float = defaults.ADMISSION_REFRESH_S
    reclaim_interval_s: float = defaults.RECLAIM_INTERVAL_S
    reclaim_min_idle_s: float = defaults.RECLAIM_MIN_IDLE_S
    max_deliveries: int = defaults.MAX_DELIVERIES
    drain_timeout_s: float = defaults.VERIFIER_DRAIN_TIMEOUT_S
    switches: Switches = field(default_factory=Switches)  # CoSine's mechanisms, each can be turned off
    cost_model: str | None = None  # a profile written by `cosine profile`; None = built-in defaults
    # Fusion across drafter workers: a request's experts may live on several workers (the job's worker leads).
    cross_fusion: bool = defaults.CROSS_PROCESS_FUSION
    trace_passes: str | None = None  # append a JSON line per verification pass to this file (PassTrace)
    # Bytes the target's KV cache may take (the worker turns it into the engine's token slots); None: no budget.
    kv_memory: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_active", "admit_per_tick"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameterError(name, f"must be an integer >= 1, got {value!r}")
        kv = self.kv_memory
        if kv is not None and (isinstance(kv, bool) or not isinstance(kv, int) or kv < 1):
            raise InvalidParameterError("kv_memory", f"must be a number of bytes >= 1, got {kv!r}")


def memory_peaks() -> dict:
    """The process's peak resident memory and, on CUDA, the most memory torch's allocator held."""
    peaks = {"rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return peaks


class VerifierService:
    def __init__(self, redis_settings: RedisSettings, settings: VerifierSettings, engine, tokenizer,
                 connector: Callable[[RedisSettings], redis.Redis] = connect,
                 identity: TokenizerIdentity | None = None) -> None:
        """``engine``: a :class:`~cosine.engine.target.TargetVerifier` (or one with its interface);
        ``connector`` makes each Redis connection (the heartbeat has one of its own); ``identity``: the
        target's tokenizer, which drafter workers must share (None: take any)."""
        self.settings = settings
        self.me = settings.worker_id
        self.keys = Keys(redis_settings.prefix)
        self.streams = Streams(connector(redis_settings), self.keys)
        self.engine = engine
        self.tokenizer = tokenizer
        vocab = engine.vocab_size
        cost = CostModel.load(settings.cost_model) if settings.cost_model else None
        self.steering = Steering(settings.switches, settings.k, cost)
        self.control = ControlView(self.streams.r, self.keys)
        self.metrics = VerifierMetrics(settings.trace_passes)
        self.output = OutputWriter(self.streams, tokenizer, vocab, self.me, self.metrics)
        self.drafts = DraftExchange(self.streams, self.steering, settings, self.metrics, vocab, engine.room, identity)
        self.book = RequestBook(self.streams, engine, tokenizer, self.output, self.steering, self.metrics, self.me,
                                hosted=self.drafts.hosted)
        self.upkeep = Upkeep(self.streams, self.book, self.metrics, self.me, settings.max_active,
                             settings.admission_refresh_s, settings.reclaim_interval_s, settings.reclaim_min_idle_s,
                             settings.max_deliveries)
        # Admission entries read but not admitted yet (at most admit_per_tick are prefilled between passes);
        # they are pending for this verifier, so a restart re-admits them and a death hands them to another.
        self.arrivals: list[Entry] = []
        self.hold_until = 0.0  # the scheduler holds the next pass until then for drafts on their way
        self.heartbeat = Heartbeat(Streams(connector(redis_settings), self.keys), self.me, self.info,
                                   inflight=lambda: json.dumps(self.inflight(), separators=(",", ":")))

    @property
    def active(self) -> dict[str, RequestState]:
        return self.book.active

    def info(self) -> dict:
        """What the heartbeat publishes."""
        control = self.control.decision
        return {
            "role": "verifier",
            "active": len(self.active),
            "capacity": self.settings.max_active,
            **self.metrics.snapshot(),
            **self.drafts.info(),
            "control_version": control.version if control is not None else 0,
            **self.engine.stats(),
            "waiting": len(self.book.waiting),  # read, not admitted: their KV reservation does not fit yet
            **memory_peaks(),
        }

    def inflight(self, limit: int = INFLIGHT_SHOWN) -> list[dict]:
        """The oldest requests held (for the dashboard): id, client, tokens out of the most asked, age, drafter."""
        now = wall_ms()
        oldest = sorted(self.active.values(), key=lambda st: st.enqueued_ms)[:limit]
        return [{"id": st.rid, "client": st.msg.client, "tokens": len(st.seq.output_ids),
                 "max": st.msg.params.max_new_tokens, "age_s": round((now - st.enqueued_ms) / 1000, 2),
                 "drafter": st.drafting.worker or ""} for st in oldest]

    def load(self) -> Load:
        """What this round's decisions depend on: the requests held, their longest context, the controller."""
        context = max((len(st.seq) for st in self.active.values()), default=0)
        return Load(len(self.active), context, self.control.current())

    # -- lifecycle ------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        log.info("verifier %s ready (k=%d, width=%d, max_active=%d)", self.me, self.settings.k,
                 self.settings.tree_width, self.settings.max_active)
        run_forever(f"verifier {self.me}", stop, self.step, on_start=self.recover_own, drain=self.drain,
                    on_stop=self._stopped, heartbeat=self.heartbeat, on_reconnect=self.resync_outputs)

    def resync_outputs(self) -> None:
        """Back on the broker after losing it: write again the output it lacks of the requests held, and end
        the requests that finished in a transaction the lost connection cut off."""
        held = list(self.active.values())
        pipe = self.streams.transaction()
        n = self.output.resync(pipe, held)
        finished = [st for st in held if st.seq.finished]
        for st in finished:
            self.book.close(pipe, st)
        if n or finished:
            pipe.execute()
        if finished:
            self.book.release(finished)
        if n:
            self.metrics.counters["output_resyncs"] += n
            log.warning("verifier %s: wrote again %d output chunks the broker had lost", self.me, n)

    def _stopped(self) -> None:
        self.metrics.close()
        log.info("verifier %s stopped with %d requests left for others to reclaim", self.me, len(self.active))

    def recover_own(self) -> None:
        """At start (and after Redis lost its groups): create the groups, re-admit the requests this worker
        held under the same id before a restart; drafts it had not consumed are stale."""
        self.streams.forget_groups()
        self.streams.ensure_group(self.keys.requests, VERIFIERS_GROUP)
        self.streams.ensure_group(self.drafts.stream, VERIFIERS_GROUP)
        mine = self.streams.own_pending(self.keys.requests, VERIFIERS_GROUP, self.me)
        if mine:
            log.info("re-admitting %d requests this verifier held before", len(mine))
            self.admit(mine)
        old = self.streams.own_pending(self.drafts.stream, VERIFIERS_GROUP, self.me)
        if old:
            pipe = self.streams.transaction()
            Streams.ack_delete(pipe, self.drafts.stream, VERIFIERS_GROUP, [eid for eid, _ in old])
            pipe.execute()

    def drain(self) -> None:
        """On shutdown: stop admitting, finish what is active for up to ``drain_timeout_s``."""
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while self.active and time.monotonic() < deadline:
            try:
                self.step(admit=False)
            except (redis.ConnectionError, redis.TimeoutError):
                break

    # -- the turn -------------------------------------------------------------------------------------
    def step(self, admit: bool = True) -> None:
        """Upkeep, read, admit, schedule, verify and send."""
        reclaimed = self.upkeep.run(time.monotonic(), admit,
                                    frozenset(eid for eid, _ in self.arrivals) | self.book.waiting_ids())
        if reclaimed:
            self.admit(reclaimed)
        self.drafts.watch(self.active)
        self.read(admit)
        wall = wall_ms()
        if admit and self.book.due(wall):  # room freed (or one waiting ends anyway): oldest first
            self.admit(self.book.take_waiting(self.settings.admit_per_tick, wall))
        if self.arrivals and admit and not self.book.waiting:  # none overtakes a request waiting for room
            n = self.settings.admit_per_tick
            now_in, self.arrivals = self.arrivals[:n], self.arrivals[n:]
            self.admit(now_in)
        with self.metrics.timed("scheduling_s"):
            ready = self.schedule(time.monotonic())
        if ready:
            self.verify(ready)
        elif self.drafts.consumed:  # drafts that turned out stale still have to be acknowledged
            pipe = self.streams.transaction()
            self.drafts.ack_consumed(pipe)
            pipe.execute()

    def read(self, admit: bool) -> None:
        """One read over the request stream (when there is room) and this worker's draft stream."""
        held = len(self.active) + len(self.arrivals) + len(self.book.waiting)
        capacity = self.settings.max_active - held if admit else 0
        streams = ([self.keys.requests] if capacity > 0 else []) + [self.drafts.stream]
        block = self.block_ms(time.monotonic())
        # A non-blocking read is messaging; a blocking one is idle time, or waiting for drafts while holding
        # requests. COUNT applies to each stream: never take more requests than there is room for (an entry
        # read is ours until it ends), then drain the drafts that did not fit into this read.
        count = capacity if capacity > 0 else DRAFT_READ_COUNT
        timers = ("messaging_s",) if block is None else ("blocked_s", "draft_wait_s") if self.active else ("blocked_s",)
        with self.metrics.timed(*timers):
            got = self.streams.read_groups(streams, VERIFIERS_GROUP, self.me, count, block)
            drafts = got.get(self.drafts.stream, [])
            if len(drafts) >= count:
                drafts += self.streams.read_group(self.drafts.stream, VERIFIERS_GROUP, self.me, DRAFT_READ_COUNT,
                                                  None)
        if drafts:
            with self.metrics.timed("messaging_s"):
                self.drafts.absorb(drafts, self.active)
        self.arrivals += got.get(self.keys.requests, [])

    def block_ms(self, now: float) -> int | None:
        """Block only while nothing can be verified (or the pass is held for drafts on their way), and not
        past the earliest draft budget; a draft arriving ends the block."""
        if self.arrivals and not self.book.waiting:  # requests read and waiting to be admitted
            return None
        if not self.active:
            return self.settings.idle_block_ms
        if self.hold_until > now:
            return max(1, int((self.hold_until - now) * 1000))
        budget = self.drafts.budget_ms() / 1000
        wait = self.settings.idle_block_ms / 1000
        for st in self.active.values():
            if st.drafting.draft is not None or st.drafting.waiting_epoch is None:
                return None
            wait = min(wait, st.drafting.job_sent + budget - now)
        return None if wait <= 0.0005 else max(1, int(wait * 1000))

    def admit(self, entries: list[Entry]) -> None:
        """Admit new requests; their first draft jobs go out before the target's prefill, so that the drafter
        prefills its own rows (and drafts) while the target prefills."""
        self.book.admit(entries, before_prefill=lambda fresh: self.drafts.dispatch(fresh, self.active, self.load()))

    def schedule(self, now: float) -> list[RequestState]:
        """The requests to verify now, chosen by the scheduler among those with a draft in hand, a late draft,
        no drafter or a plain step due (or none, when the pass is held for drafts on their way)."""
        budget = self.drafts.budget_ms() / 1000
        eta = self.drafts.eta_ms()
        wall = wall_ms()
        cands: list[Candidate] = []
        coming: list[tuple[Candidate, float]] = []
        late: set[str] = set()
        for st in self.active.values():
            d = st.drafting
            waiting = d.waiting
            if waiting and now - d.job_sent >= budget:
                late.add(st.rid)  # verified without its draft (a plain step); the draft is dropped when it comes
                waiting = False
            depth = depth_of(d.draft.parents) if d.draft else (d.k if waiting else 0)
            size = 1 + (len(d.draft.tokens) if d.draft else depth)
            deadline = None if st.msg.deadline_ms is None else float(st.msg.deadline_ms - wall)
            cand = Candidate(st.rid, size, self.steering.expected(d.steer, depth), len(st.seq), st.msg.priority,
                             deadline, (now - d.job_sent) * 1000, depth > 0)
            if waiting:
                coming.append((cand, eta - (now - d.job_sent) * 1000))
            else:
                cands.append(cand)
        needy = [st for st in self.active.values()  # a new drafter, a resync: a job now
                 if st.drafting.waiting_epoch is None and st.drafting.draft is None and not st.drafting.plain]
        if needy:
            self.drafts.dispatch(needy, self.active, self.load())
        if not cands:
            return []
        control = self.control.current()
        hold = self.steering.hold(cands, coming, self.settings.max_active, self.settings.max_batch_tokens, control)
        if hold > 0:
            self.hold_until = now + hold / 1000
            self.metrics.counters["held_passes"] += 1
            return []
        chosen = set(self.steering.pick(cands, self.settings.max_active, self.settings.max_batch_tokens, control))
        for rid in chosen & late:
            self.active[rid].counters.late += 1
            self.metrics.counters["late_drafts"] += 1
        return [st for st in self.active.values() if st.rid in chosen]

    def verify(self, ready: list[RequestState]) -> None:
        """One target forward over ``ready``; then their output, next jobs and acknowledgements in one MULTI."""
        vocab = self.engine.vocab_size
        drafts = {st.rid: tree_of(st.drafting.draft, vocab) if st.drafting.draft else None for st in ready}
        bets = sum(bool(st.drafting.draft and st.drafting.draft.assumed) for st in ready)
        for st in ready:
            if st.drafting.draft is not None:
                st.counters.draft_ms += st.drafting.draft.draft_ms
                st.counters.drafters_used.add(st.drafting.draft.drafter)
        self.metrics.counters["passes"] += 1
        self.metrics.counters["pass_tokens"] += sum(1 + (len(t.tokens) if t else 0) for t in drafts.values())
        since = self.metrics.since_last_pass()
        if since is not None:
            self.steering.observe_pass(*since, fresh=bets < sum(1 for t in drafts.values() if t))
        t0 = time.perf_counter()
        try:
            results = self.engine.step(drafts)
        except Exception as exc:  # the engine failing a batch must end those requests explicitly
            log.exception("verification failed for %d requests", len(ready))
            self.book.end(ready, FinishReason.ERROR, f"verification failed: {type(exc).__name__}: {exc}",
                          "server_error")
            return
        forward_s = time.perf_counter() - t0
        self.metrics.busy_s += forward_s
        self.metrics.rounds += 1
        with self.metrics.timed("messaging_s"):
            finished = self._commit(ready, results, forward_s)
        stats = self.engine.stats()
        self.metrics.trace_pass({"slots_run": stats["slots_run"], "slots_fed": stats["slots_fed"]},
                                active=len(self.active), verified=len(ready),
                                depths=[t.depth if t else 0 for t in drafts.values()], bets=bets,
                                forward_ms=round(forward_s * 1000, 3),
                                draft_share=round(self.steering.draft_share(), 3),
                                pass_overhead_ms=round(self.steering.pass_overhead_ms, 3))
        if finished:
            self.book.release(finished)

    def _commit(self, ready: list[RequestState], results, forward_s: float) -> list[RequestState]:
        """Feedback to steering, then one MULTI: output chunks, closes, next draft jobs, acknowledgements.
        Returns the requests that finished."""
        added = {r.seq.seq_id: len(r.new_tokens) for r in results}
        for r in results:
            st = self.active[r.seq.seq_id]
            d = st.drafting.draft
            self.metrics.verified(r.depth, r.accepted, d.drafter if d else "", st.drafting.steer.feature)
            self.steering.observe(st.drafting.steer, r.depth, r.accepted, r.new_tokens, d.votes if d else {},
                                  d.vote_conf if d else {},
                                  len(d.tokens) if d and r.depth == depth_of(d.parents) else 0)  # not cut short
        pipe = self.streams.transaction()
        finished: list[RequestState] = []
        continuing: list[RequestState] = []
        wall = wall_ms()
        for st in ready:
            st.counters.verify_s += forward_s / len(ready)
            st.drafting.draft = None
            st.drafting.waiting_epoch = None
            apply_stop_strings(st.seq, self.tokenizer, added.get(st.rid, 0))
            if not st.seq.finished and st.msg.deadline_ms is not None and wall > st.msg.deadline_ms:
                st.seq.finish_reason = FinishReason.TIMEOUT
            self.output.write(pipe, st)
            (finished if st.seq.finished else continuing).append(st)
        for st in finished:
            self.book.close(pipe, st)
        self.drafts.settle_bets(continuing)
        jobs = self.drafts.queue_jobs(pipe, continuing, self.active, self.load())
        self.drafts.ack_consumed(pipe)
        pipe.execute()
        self.drafts.sent(jobs)
        return finished
