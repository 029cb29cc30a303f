"""The verifier service: owns requests, holds the target's KV state, verifies drafts in batches.

Per tick: maintenance (keep admission entries fresh, reclaim a dead verifier's requests, cancellations,
deadlines), one read over the request stream and this worker's draft stream (blocking only when nothing
can be verified), admission of new requests (recovering committed tokens from their output streams when
they were reclaimed), then one batched target forward over every request whose draft arrived or is late,
and one MULTI that writes the output chunks, sends the next draft jobs and acknowledges what was consumed.

A draft is a hint: built on another committed length (stale), from a drafter that is no longer assigned,
or missing past its budget (late), it is dropped and the request advances with a plain target step.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import statistics
import threading
import time
from dataclasses import dataclass, field

import redis
import torch

from cosine import defaults
from cosine.broker import Entry, RedisSettings, Streams, connect, is_nogroup, now_ms
from cosine.engine.sequence import FinishReason, Sequence
from cosine.engine.stopping import apply_stop_strings
from cosine.engine.tree import DraftTree, depth_of
from cosine.engine.verifier import TargetVerifier
from cosine.errors import InvalidParameterError
from cosine.keys import VERIFIERS_GROUP, Keys
from cosine.policy.cost_model import CostModel
from cosine.policy.scheduling import Candidate
from cosine.protocol import (
    Cancel,
    Chunk,
    Draft,
    DraftClose,
    DraftJob,
    GenerationRequest,
    ProtocolError,
    decode_entry,
    entry,
    peek_request_id,
)
from cosine.service.control import ControlView
from cosine.service.heartbeat import Heartbeat
from cosine.service.loop import Backoff
from cosine.service.pass_trace import PassTrace
from cosine.service.steering import RequestSteer, Steering, Switches
from cosine.service.text import TextStream

log = logging.getLogger(__name__)

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
    output_ttl_s: float = defaults.OUTPUT_TTL_S
    drain_timeout_s: float = defaults.VERIFIER_DRAIN_TIMEOUT_S
    switches: Switches = field(default_factory=Switches)  # CoSine's mechanisms, each can be turned off
    cost_model: str | None = None  # a profile written by `cosine profile`; None = built-in defaults
    # Fusion across drafter workers: a request's experts may live on several workers (the job's worker leads).
    cross_fusion: bool = defaults.CROSS_PROCESS_FUSION
    trace_passes: str | None = None  # append a JSON line per verification pass to this file (PassTrace)

    def __post_init__(self) -> None:
        for name in ("max_active", "admit_per_tick"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameterError(name, f"must be an integer >= 1, got {value!r}")


@dataclass
class Active:
    """A request this verifier owns."""

    msg: GenerationRequest
    entry_id: bytes
    seq: Sequence
    admitted_ms: int
    text: TextStream = field(default_factory=TextStream)
    chunk_seq: int = 0  # next chunk's sequence number
    sent: int = 0  # output tokens already written to the output stream
    drafter: str | None = None  # drafter worker id (with fusion across workers: the lead)
    peers: dict[str, str] = field(default_factory=dict)  # fusion across workers: expert -> worker asked
    known: int = 0  # committed tokens the drafter has been sent
    waiting_epoch: int | None = None  # epoch of the outstanding draft job
    job_sent: float = 0.0  # monotonic time the outstanding job was sent
    draft: Draft | None = None
    draft_ms: float = 0.0
    verify_s: float = 0.0
    stale: int = 0
    late: int = 0
    resyncs: int = 0
    drafters_used: set[str] = field(default_factory=set)
    steer: RequestSteer | None = None
    plain: bool = False  # the next round is a plain target step (speculation 0)
    lookahead_hits: int = 0

    @property
    def rid(self) -> str:
        return self.msg.request_id


def _least_loaded(workers: list[str], load: collections.Counter) -> str:
    """The worker with the fewest requests in ``load`` (ties: by name, so the choice is deterministic)."""
    return min(workers, key=lambda w: (load[w], w))


def request_seed(msg: GenerationRequest) -> int:
    """The request's sampling seed; derived from its id when not given, so a reclaimed request keeps it."""
    if msg.seed is not None:
        return msg.seed
    return int.from_bytes(hashlib.blake2b(msg.request_id.encode(), digest_size=8).digest(), "little") >> 1


class VerifierService:
    def __init__(self, redis_settings: RedisSettings, settings: VerifierSettings, engine: TargetVerifier,
                 tokenizer) -> None:
        self.settings = settings
        self.me = settings.worker_id
        self.keys = Keys(redis_settings.prefix)
        self.streams = Streams(connect(redis_settings), self.keys)
        self.engine = engine
        self.tokenizer = tokenizer
        self.vocab = engine.runner.vocab_size
        self.verify_stream = self.keys.verify(self.me)
        self.active: dict[str, Active] = {}
        self.consumed: list[bytes] = []  # draft-stream entries to acknowledge with the next write
        # Admission entries read but not admitted yet (at most admit_per_tick are prefilled between passes);
        # they are pending for this verifier, so a restart re-admits them and a death hands them to another.
        self.arrivals: list[Entry] = []
        self.rtts: collections.deque[float] = collections.deque(maxlen=64)
        self.drafters: dict[str, dict] = {}
        self._drafters_at = 0.0
        self._refresh_at = 0.0
        self._reclaim_at = 0.0
        self._cancels_at = 0.0
        self.cancel_cursor = "$"
        self.hold_until = 0.0  # the scheduler holds the next pass until then for drafts on their way
        # metrics
        self.started = time.monotonic()
        self.rounds = 0
        self.busy_s = 0.0  # time in target forwards (prefills included)
        self.admit_s = 0.0  # of it, time prefilling admitted requests
        self.messaging_s = 0.0  # time in Redis calls and (de)serialisation on the round path
        self.blocked_s = 0.0  # time in blocking reads: waiting for drafts or requests (idle)
        self.draft_wait_s = 0.0  # of it, time waiting while holding requests (for drafts on their way)
        self.scheduling_s = 0.0  # time choosing what to verify (the scheduler and its candidates)
        self.completed = 0
        self.counters = collections.Counter()
        self.heartbeat = Heartbeat(Streams(connect(redis_settings), self.keys), self.me, self.info)
        cost = CostModel.load(settings.cost_model) if settings.cost_model else None
        self.steering = Steering(settings.switches, settings.k, cost)
        self.control = ControlView(self.streams.r, self.keys)
        self.trace = PassTrace(settings.trace_passes) if settings.trace_passes else None
        self._since_pass: tuple[float, float] | None = None  # draft wait, overhead (s) at the last pass

    # -- observability --------------------------------------------------------------------------------
    def info(self) -> dict:
        up = max(time.monotonic() - self.started, 1e-9)
        return {
            "role": "verifier",
            "active": len(self.active),
            "capacity": self.settings.max_active,
            "rounds": self.rounds,
            "completed": self.completed,
            "busy": round(self.busy_s / up, 4),
            "messaging_s": round(self.messaging_s, 4),
            "blocked_s": round(self.blocked_s, 4),
            "draft_wait_s": round(self.draft_wait_s, 4),
            "scheduling_s": round(self.scheduling_s, 4),
            "busy_s": round(self.busy_s, 4),
            "admit_s": round(self.admit_s, 4),
            "uptime_s": round(up, 3),
            "draft_budget_ms": round(self.draft_budget_ms(), 2),
            "draft_rtt_p50_ms": round(statistics.median(self.rtts), 2) if self.rtts else 0.0,
            "control_version": self.steering.control.version if self.steering.control else 0,
            "pid": os.getpid(),
            "slots_run": self.engine.runner.slots_run,  # token slots the target's forwards computed
            "slots_fed": self.engine.runner.slots_fed,  # of them, slots holding a fed token (not padding)
            **{k: v for k, v in self.counters.items()},
        }

    def draft_budget_ms(self) -> float:
        s = self.settings
        if len(self.rtts) < 4:
            return max(s.draft_budget_min_ms, min(s.draft_budget_max_ms, 500.0))
        ordered = sorted(self.rtts)
        p90 = ordered[int(0.9 * (len(ordered) - 1))]
        return max(s.draft_budget_min_ms, min(s.draft_budget_max_ms, s.draft_budget_factor * p90))

    # -- main loop ------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        self.heartbeat.beat()
        self.heartbeat.start()
        backoff = Backoff()
        log.info("verifier %s ready (k=%d, width=%d, max_active=%d)", self.me, self.settings.k,
                 self.settings.tree_width, self.settings.max_active)
        started = False
        try:
            while not stop.is_set():
                try:
                    if not started:
                        self.recover_own()
                        started = True
                    self.tick()
                    backoff.reset()
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    backoff.wait(stop, f"verifier {self.me}: Redis unavailable ({exc})")
                except redis.ResponseError as exc:
                    if is_nogroup(exc):
                        log.warning("consumer groups vanished (Redis lost its data?): recreating them")
                        self.streams.forget_groups()
                        started = False
                    else:
                        log.exception("Redis refused a command")
                    backoff.wait(stop, f"verifier {self.me}: {exc}")
                except Exception:  # a bug must not take requests down with the worker: log, back off, go on
                    log.exception("verifier %s: unexpected error in the loop", self.me)
                    backoff.wait(stop, f"verifier {self.me}: recovering from an unexpected error")
            self.drain()
        finally:
            self.heartbeat.stop()
            if self.trace is not None:
                self.trace.close()
            log.info("verifier %s stopped with %d requests left for others to reclaim", self.me, len(self.active))

    def drain(self) -> None:
        """On shutdown: stop admitting, finish what is active for up to ``drain_timeout_s``."""
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while self.active and time.monotonic() < deadline:
            try:
                self.tick(admit=False)
            except (redis.ConnectionError, redis.TimeoutError):
                break

    def recover_own(self) -> None:
        """After a restart under the same id: re-admit our pending requests; old drafts are stale."""
        self.streams.ensure_group(self.keys.requests, VERIFIERS_GROUP)
        self.streams.ensure_group(self.verify_stream, VERIFIERS_GROUP)
        mine = self.streams.own_pending(self.keys.requests, VERIFIERS_GROUP, self.me)
        if mine:
            log.info("re-admitting %d requests this verifier held before", len(mine))
            self.admit(mine)
        old = self.streams.own_pending(self.verify_stream, VERIFIERS_GROUP, self.me)
        if old:
            pipe = self.streams.r.pipeline(transaction=True)
            Streams.ack_delete(pipe, self.verify_stream, VERIFIERS_GROUP, [eid for eid, _ in old])
            pipe.execute()

    def tick(self, admit: bool = True) -> None:
        now = time.monotonic()
        self.maintenance(now, admit)
        capacity = self.settings.max_active - len(self.active) - len(self.arrivals) if admit else 0
        streams = ([self.keys.requests] if capacity > 0 else []) + [self.verify_stream]
        block = self.block_ms(now)
        # COUNT applies to each stream: never take more requests than there is room for (an entry read is
        # ours until it ends), then drain the drafts that did not fit into this read.
        count = capacity if capacity > 0 else DRAFT_READ_COUNT
        t0 = time.perf_counter()
        got = self.streams.read_groups(streams, VERIFIERS_GROUP, self.me, count, block)
        drafts = got.get(self.verify_stream, [])
        if len(drafts) >= count:
            drafts += self.streams.read_group(self.verify_stream, VERIFIERS_GROUP, self.me, DRAFT_READ_COUNT, None)
        if block is None:  # a non-blocking read is messaging overhead; a blocking one is idle time
            self.messaging_s += time.perf_counter() - t0
        else:
            waited = time.perf_counter() - t0
            self.blocked_s += waited
            if self.active:
                self.draft_wait_s += waited
        if drafts:
            t1 = time.perf_counter()
            self.absorb(drafts)
            self.messaging_s += time.perf_counter() - t1
        self.arrivals += got.get(self.keys.requests, [])
        if self.arrivals and admit:
            now_in, self.arrivals = (self.arrivals[: self.settings.admit_per_tick],
                                     self.arrivals[self.settings.admit_per_tick :])
            self.admit(now_in)
        t2 = time.perf_counter()
        ready = self.pick_ready(time.monotonic())
        self.scheduling_s += time.perf_counter() - t2
        if ready:
            self.verify(ready)
        elif self.consumed:  # drafts that turned out stale still have to be acknowledged
            pipe = self.streams.r.pipeline(transaction=True)
            Streams.ack_delete(pipe, self.verify_stream, VERIFIERS_GROUP, self.consumed)
            pipe.execute()
            self.consumed = []

    def block_ms(self, now: float) -> int | None:
        """Block only while nothing can be verified (or the pass is held for drafts on their way), and not
        past the earliest draft budget; a draft arriving ends the block."""
        if self.arrivals:  # requests read and waiting to be admitted
            return None
        if not self.active:
            return self.settings.idle_block_ms
        if self.hold_until > now:
            return max(1, int((self.hold_until - now) * 1000))
        budget = self.draft_budget_ms() / 1000
        wait = self.settings.idle_block_ms / 1000
        for st in self.active.values():
            if st.draft is not None or st.waiting_epoch is None:
                return None
            wait = min(wait, st.job_sent + budget - now)
        return None if wait <= 0.0005 else max(1, int(wait * 1000))

    # -- admission ------------------------------------------------------------------------------------
    def admit(self, entries: list) -> None:
        """Admit requests: decode, look up earlier output and cancellation (one round trip for all), prefill."""
        fresh: list[Active] = []
        pipe = self.streams.r.pipeline(transaction=True)
        decoded: list[tuple[bytes, GenerationRequest]] = []
        for eid, fields in entries:
            try:
                msg = decode_entry(fields, (GenerationRequest,), self.vocab)
            except ProtocolError as exc:
                self.streams.dead_letter(self.keys.requests, VERIFIERS_GROUP, eid, fields, exc.reason, self.me)
                self.counters["dead_lettered"] += 1
                rid = peek_request_id(fields)
                if rid is not None and rid not in self.active:  # tell its client instead of leaving it waiting
                    chunk = Chunk(rid, 0, 0, [], "", True, FinishReason.ERROR.value, exc.reason, "invalid_request",
                                  verifier=self.me)
                    pipe.xadd(self.keys.out(rid), entry(chunk), maxlen=defaults.STREAM_MAXLEN, approximate=True)
                    pipe.pexpire(self.keys.out(rid), int(self.settings.output_ttl_s * 1000))
                continue
            if msg.request_id not in self.active:  # else a re-delivery of a request we already serve
                decoded.append((eid, msg))
        lookups = self.streams.r.pipeline(transaction=False)
        for _eid, msg in decoded:
            lookups.xrange(self.keys.out(msg.request_id))
            lookups.exists(self.keys.cancelled(msg.request_id))
        found = lookups.execute() if decoded else []
        for i, (eid, msg) in enumerate(decoded):
            st = self.recover(msg, eid, pipe, self._chunks(found[2 * i]), bool(found[2 * i + 1]))
            if st is not None:
                fresh.append(st)
        pipe.execute()
        if not fresh:
            return
        t0 = time.perf_counter()
        self.engine.admit([st.seq for st in fresh])
        prefill_s = time.perf_counter() - t0
        self.busy_s += prefill_s
        self.admit_s += prefill_s
        for st in fresh:
            self.active[st.rid] = st
            self.counters["admitted"] += 1
        self.dispatch(fresh)

    def recover(self, msg: GenerationRequest, eid: bytes, pipe, chunks: list[Chunk], cancelled: bool) -> Active | None:
        """Build the request's state; resume from its earlier output if another verifier started it."""
        rid = msg.request_id
        output: list[int] = []
        emitted = 0
        last_seq = -1
        for ch in chunks:  # sorted by seq, duplicates removed
            if ch.finished:
                Streams.ack_delete(pipe, self.keys.requests, VERIFIERS_GROUP, [eid])
                return None
            if ch.offset <= len(output):
                output.extend(ch.token_ids[len(output) - ch.offset :])
            emitted += len(ch.text)
            last_seq = ch.seq
        admitted = now_ms()
        try:
            prompt_ids = self._prompt_ids(msg)
            seq = Sequence(prompt_ids, msg.sampling_params(), seq_id=rid, seed=request_seed(msg))
            self.engine.validate(seq)
        except InvalidParameterError as exc:
            self._finish_with_error(pipe, msg, eid, last_seq + 1, len(output), str(exc), "invalid_request")
            return None
        seq.output_ids = output
        st = Active(msg, eid, seq, admitted, chunk_seq=last_seq + 1, sent=len(output), steer=self.steering.new())
        st.text.emitted = emitted
        if output:
            self.counters["resumed"] += 1
            log.info("request %s resumed at %d committed tokens", rid, len(output))
        if cancelled:
            self._finish_now(pipe, st, FinishReason.CANCELLED)
            return None
        if msg.deadline_ms is not None and admitted > msg.deadline_ms:
            self._finish_now(pipe, st, FinishReason.TIMEOUT)
            return None
        return st

    def _chunks(self, rows: list) -> list[Chunk]:
        """Decoded output chunks of a stream, by sequence number, one per number."""
        by_seq: dict[int, Chunk] = {}
        for _eid, fields in rows:
            try:
                ch = decode_entry(fields, (Chunk,), self.vocab)
            except ProtocolError:
                continue
            by_seq.setdefault(ch.seq, ch)  # type: ignore[attr-defined]
        return [by_seq[k] for k in sorted(by_seq)]

    def _read_chunks(self, rid: str) -> list[Chunk]:
        return self._chunks(self.streams.r.xrange(self.keys.out(rid)))

    def _prompt_ids(self, msg: GenerationRequest) -> list[int]:
        if msg.prompt_ids is not None:
            return list(msg.prompt_ids)
        return list(self.tokenizer(msg.prompt, add_special_tokens=False)["input_ids"])

    # -- drafts ---------------------------------------------------------------------------------------
    def absorb(self, entries: list) -> None:
        now_wall = now_ms()
        for eid, fields in entries:
            self.consumed.append(eid)
            try:
                msg = decode_entry(fields, (Draft,), self.vocab)
            except ProtocolError as exc:
                self.consumed.pop()
                self.streams.dead_letter(self.verify_stream, VERIFIERS_GROUP, eid, fields, exc.reason, self.me)
                self.counters["dead_lettered"] += 1
                continue
            if msg.job_sent_ms:  # late or not, every reply tells how long drafting round trips take
                self.rtts.append(max(0.0, now_wall - msg.job_sent_ms))
            st = self.active.get(msg.request_id)
            if st is None or msg.drafter != st.drafter or msg.epoch != len(st.seq) or st.draft is not None:
                self.counters["stale_drafts"] += 1
                if st is not None:
                    st.stale += 1
                continue
            if msg.resync:
                st.known = 0
                st.waiting_epoch = None
                st.resyncs += 1
                self.counters["resyncs"] += 1
                continue
            self.steering.learn_feature(st.steer, msg.feature, self._pool(st.drafter))
            if msg.lookahead:
                st.lookahead_hits += 1
                self.counters["lookahead_hits"] += 1
            st.draft = msg

    def pick_ready(self, now: float) -> list[Active]:
        """Requests to verify now, chosen by the scheduler among those with a draft in hand, a late draft,
        no drafter or a plain step due."""
        budget = self.draft_budget_ms() / 1000
        wall = now_ms()
        cands: list[Candidate] = []
        coming: list[tuple[Candidate, float]] = []
        late: set[str] = set()
        eta = self.draft_eta_ms()
        for st in self.active.values():
            waiting = st.draft is None and st.drafter is not None and st.waiting_epoch is not None and not st.plain
            if waiting and now - st.job_sent >= budget:
                late.add(st.rid)  # verified without its draft (a plain step); the draft is dropped when it comes
                waiting = False
            depth = depth_of(st.draft.parents) if st.draft else (st.steer.k if waiting else 0)
            size = 1 + (len(st.draft.tokens) if st.draft else depth)
            deadline = None if st.msg.deadline_ms is None else float(st.msg.deadline_ms - wall)
            cand = Candidate(st.rid, size, self.steering.expected(st.steer, depth), len(st.seq), st.msg.priority,
                             deadline, (now - st.job_sent) * 1000, depth > 0)
            if waiting:
                coming.append((cand, eta - (now - st.job_sent) * 1000))
            else:
                cands.append(cand)
        self._dispatch_needy()
        if not cands:
            return []
        hold = self.steering.hold(cands, coming, self.settings.max_active, self.settings.max_batch_tokens)
        if hold > 0:
            self.hold_until = now + hold / 1000
            self.counters["held_passes"] += 1
            return []
        chosen = set(self.steering.pick(cands, self.settings.max_active, self.settings.max_batch_tokens))
        for rid in chosen & late:
            self.active[rid].late += 1
            self.counters["late_drafts"] += 1
        return [st for st in self.active.values() if st.rid in chosen]

    def draft_eta_ms(self) -> float:
        """When a draft is expected after its job was sent: the median recent round trip."""
        if not self.rtts:
            return 0.0
        ordered = sorted(self.rtts)
        return ordered[len(ordered) // 2]

    def _dispatch_needy(self) -> None:
        """Requests that need a job (new drafter, resync) get one now."""
        needy = [st for st in self.active.values() if st.waiting_epoch is None and st.draft is None and not st.plain]
        if needy:
            self.dispatch(needy)

    # -- verification ---------------------------------------------------------------------------------
    def verify(self, ready: list[Active]) -> None:
        drafts: dict[str, DraftTree | None] = {}
        for st in ready:
            d = st.draft
            drafts[st.rid] = self._tree(d) if d else None
            if d is not None:
                st.draft_ms += d.draft_ms
                st.drafters_used.add(d.drafter)
        self.counters["passes"] += 1
        self.counters["pass_tokens"] += sum(1 + (len(t.tokens) if t else 0) for t in drafts.values())
        self._observe_pass()
        t0 = time.perf_counter()
        try:
            results = self.engine.step(drafts)
        except Exception as exc:  # the engine failing a batch must end those requests explicitly
            log.exception("verification failed for %d requests", len(ready))
            self._fail(ready, f"verification failed: {type(exc).__name__}: {exc}")
            return
        forward_s = time.perf_counter() - t0
        self.busy_s += forward_s
        self.rounds += 1
        t1 = time.perf_counter()
        added = {r.seq.seq_id: len(r.new_tokens) for r in results}
        for r in results:
            st = self.active[r.seq.seq_id]
            d = st.draft
            self.steering.observe(st.steer, r.depth, r.accepted, r.new_tokens, d.votes if d else {},
                                  d.vote_conf if d else {},
                                  len(d.tokens) if d and r.depth == depth_of(d.parents) else 0)  # not cut short
        pipe = self.streams.r.pipeline(transaction=True)
        finished: list[Active] = []
        continuing: list[Active] = []
        wall = now_ms()
        for st in ready:
            st.verify_s += forward_s / len(ready)
            st.draft = None
            st.waiting_epoch = None
            apply_stop_strings(st.seq, self.tokenizer, added.get(st.rid, 0))
            if not st.seq.finished and st.msg.deadline_ms is not None and wall > st.msg.deadline_ms:
                st.seq.finish_reason = FinishReason.TIMEOUT
            self._write_chunk(pipe, st)
            (finished if st.seq.finished else continuing).append(st)
        for st in finished:
            self._close(pipe, st)
        jobs = self._queue_jobs(pipe, continuing)
        Streams.ack_delete(pipe, self.verify_stream, VERIFIERS_GROUP, self.consumed)
        self.consumed = []
        pipe.execute()
        self._jobs_sent(jobs)
        self.messaging_s += time.perf_counter() - t1
        if self.trace is not None:
            self.trace.record(self._trace_counters(), active=len(self.active), verified=len(ready),
                              depths=[t.depth if t else 0 for t in drafts.values()],
                              forward_ms=round(forward_s * 1000, 3),
                              draft_share=round(self.steering.draft_share(), 3),
                              pass_overhead_ms=round(self.steering.pass_overhead_ms, 3))
        if finished:
            self._release(finished)

    def _observe_pass(self) -> None:
        """Tell steering what the time since the previous pass held besides its forward: waiting for drafts,
        and the rest of a round's work (Redis, serialisation, scheduling, prefilling arrivals)."""
        wait, overhead = self.draft_wait_s, self.messaging_s + self.scheduling_s + self.admit_s
        if self._since_pass is not None:  # the first pass has no previous one (start-up is not a round)
            last_wait, last_overhead = self._since_pass
            self.steering.observe_pass(1000 * (wait - last_wait), 1000 * (overhead - last_overhead))
        self._since_pass = (wait, overhead)

    def _trace_counters(self) -> dict[str, float]:
        """What a pass-trace line reports as grown since the previous pass."""
        return {"admit_ms": self.admit_s * 1000, "messaging_ms": self.messaging_s * 1000,
                "blocked_ms": self.blocked_s * 1000, "scheduling_ms": self.scheduling_s * 1000,
                "slots_run": self.engine.runner.slots_run, "slots_fed": self.engine.runner.slots_fed}

    def _tree(self, d: Draft) -> DraftTree:
        tree = DraftTree(list(d.tokens), list(d.parents), list(d.confidences), list(d.sources))
        if d.q_ids:
            tree.q = []
            for ids, probs in zip(d.q_ids, d.q_probs):
                q = torch.zeros(self.vocab)
                q[torch.tensor(ids)] = torch.tensor(probs)
                tree.q.append(q / q.sum())
        return tree

    def _write_chunk(self, pipe, st: Active, error: str | None = None, error_type: str | None = None) -> None:
        """Queue the output chunk holding everything committed since the last chunk."""
        out = st.seq.output_ids
        finished = st.seq.finished
        text = st.text.delta(st.seq, self.tokenizer, finished)
        if st.sent == len(out) and not finished and not text:
            return
        chunk = Chunk(
            st.rid, st.chunk_seq, st.sent, out[st.sent :], text, finished,
            st.seq.finish_reason.value if finished else None, error, error_type, verifier=self.me,
        )
        if finished:
            chunk.stats = self._stats(st)
        pipe.xadd(self.keys.out(st.rid), entry(chunk), maxlen=defaults.STREAM_MAXLEN, approximate=True)
        st.chunk_seq += 1
        st.sent = len(out)

    def _stats(self, st: Active) -> dict:
        s = st.seq.stats.as_dict()
        total_ms = now_ms() - st.msg.created_ms if st.msg.created_ms else None
        s.update(
            {
                "prompt_tokens": len(st.seq.prompt_ids),
                "completion_tokens": len(st.seq.output_ids),
                "queue_ms": max(0, st.admitted_ms - st.msg.created_ms) if st.msg.created_ms else None,
                "drafting_ms": round(st.draft_ms, 3),
                "verifying_ms": round(st.verify_s * 1000, 3),
                "total_ms": total_ms,
                "stale_drafts": st.stale,
                "late_drafts": st.late,
                "resyncs": st.resyncs,
                "verifier": self.me,
                "drafter_workers": sorted(st.drafters_used),
                "lookahead_hits": st.lookahead_hits,
                "prompt_feature": st.steer.feature if st.steer else "",
            }
        )
        return s

    def _close(self, pipe, st: Active) -> None:
        """The request ended: acknowledge its admission entry, let its output expire, free the drafter."""
        Streams.ack_delete(pipe, self.keys.requests, VERIFIERS_GROUP, [st.entry_id])
        pipe.pexpire(self.keys.out(st.rid), int(self.settings.output_ttl_s * 1000))
        if st.drafter is not None:
            pipe.xadd(self.keys.draft(st.drafter), entry(DraftClose(st.rid)), maxlen=defaults.STREAM_MAXLEN,
                      approximate=True)

    def _release(self, done: list[Active]) -> None:
        ids = [st.rid for st in done]
        self.engine.release([i for i in ids if i in self.engine.seqs])
        for st in done:
            self.active.pop(st.rid, None)
            self.completed += 1
            self.counters[f"finish_{st.seq.finish_reason.value if st.seq.finish_reason else 'none'}"] += 1
            log.info("request %s finished (%s): %d tokens, acceptance length %.2f", st.rid,
                     st.seq.finish_reason.value if st.seq.finish_reason else "?", len(st.seq.output_ids),
                     st.seq.stats.mean_acceptance_length)

    def _finish_now(self, pipe, st: Active, reason: FinishReason, error: str | None = None,
                    error_type: str | None = None) -> None:
        st.seq.finish_reason = reason
        self._write_chunk(pipe, st, error, error_type)
        self._close(pipe, st)

    def _finish_with_error(self, pipe, msg: GenerationRequest, eid: bytes, chunk_seq: int, offset: int,
                           error: str, error_type: str) -> None:
        chunk = Chunk(msg.request_id, chunk_seq, offset, [], "", True, FinishReason.ERROR.value, error, error_type,
                      verifier=self.me)
        pipe.xadd(self.keys.out(msg.request_id), entry(chunk), maxlen=defaults.STREAM_MAXLEN, approximate=True)
        pipe.pexpire(self.keys.out(msg.request_id), int(self.settings.output_ttl_s * 1000))
        Streams.ack_delete(pipe, self.keys.requests, VERIFIERS_GROUP, [eid])
        self.counters["rejected"] += 1
        log.warning("request %s rejected: %s", msg.request_id, error)

    def _fail(self, sts: list[Active], error: str) -> None:
        pipe = self.streams.r.pipeline(transaction=True)
        for st in sts:
            self._finish_now(pipe, st, FinishReason.ERROR, error, "server_error")
        pipe.execute()
        self._release(sts)

    # -- draft jobs -----------------------------------------------------------------------------------
    def dispatch(self, sts: list[Active]) -> None:
        pipe = self.streams.r.pipeline(transaction=False)
        jobs = self._queue_jobs(pipe, sts)
        if jobs:
            pipe.execute()
            self._jobs_sent(jobs)

    def _queue_jobs(self, pipe, sts: list[Active]) -> list[tuple[Active, int]]:
        """Queue the next draft job of each request (length and drafter models from the policies, a live
        drafter worker); a request given 0 positions takes a plain target step. Returns (state, epoch)."""
        jobs = []
        self._refresh_drafters()
        self.steering.batch = len(self.active)
        self.steering.context = max((len(st.seq.tokens) for st in self.active.values()), default=0)
        rooms = {st.rid: self.engine.room(st.seq) for st in sts}
        ks = {st.rid: self.steering.k_for(st.steer, st.msg.speculation, st.msg.spec_k, rooms[st.rid]) for st in sts}
        adaptive = {st.rid: (st.steer, rooms[st.rid]) for st in sts if self.steering.adapts(st.msg.speculation)}
        ks = self.steering.cap(ks, self.settings.tree_width, self.settings.max_batch_tokens, adaptive)
        for st in sts:
            k = ks[st.rid]
            drafter = self._drafter_for(st) if k > 0 else None
            st.plain = k <= 0 or drafter is None
            if st.plain:
                self.counters["plain_steps"] += 1
                continue
            self.counters["draft_jobs"] += 1
            self.counters["draft_positions"] += k
            experts, weights = self.steering.experts_for(st.steer, self._pool(drafter), st.msg.drafter,
                                                         st.msg.drafters)
            sampled = self.settings.proposal == "sampled" and not st.seq.params.greedy
            peers: dict[str, str] = {}
            if self.settings.cross_fusion and experts and not sampled:
                drafter = self._lead_for(st, experts, pipe)
                experts, weights, peers = self._peers_for(st, drafter, experts, weights)
            st.steer.k = k
            tokens = st.seq.tokens
            epoch = len(tokens)
            base = st.known if 0 < st.known <= epoch - 1 else 0
            job = DraftJob(st.rid, self.me, epoch, base, tokens[base:], k, self.settings.tree_width,
                           experts=experts, expert_weights=weights, peers=peers, sent_ms=now_ms())
            params = st.seq.params
            if sampled:
                job.proposal, job.width, job.q_top = "sampled", 1, self.settings.q_top
                job.temperature, job.top_p, job.top_k = params.temperature, params.top_p, params.top_k
                job.seed, job.position = st.seq.seed, len(st.seq.output_ids)
            pipe.xadd(self.keys.draft(drafter), entry(job), maxlen=defaults.STREAM_MAXLEN, approximate=True)
            jobs.append((st, epoch))
        return jobs

    def _hosted(self, drafter: str | None) -> list[str]:
        """The drafter models a drafter worker hosts (from its heartbeat)."""
        info = self.drafters.get(drafter or "", {})
        return [e for e in str(info.get("experts", "")).split(",") if e]

    def _pool(self, drafter: str | None) -> list[str]:
        """The drafter models a request can draft with: its worker's, or with fusion across workers every
        live worker's (its worker's first)."""
        own = self._hosted(drafter)
        if not self.settings.cross_fusion:
            return own
        others = sorted({e for w in self.drafters for e in self._hosted(w)} - set(own))
        return own + others

    def _lead_for(self, st: Active, experts: list[str], pipe) -> str | None:
        """Fusion across workers: the request's worker leads while it hosts one of the chosen experts;
        otherwise the lead moves to the least loaded worker hosting the best one (the old lead is told)."""
        if st.drafter is None or set(experts) & set(self._hosted(st.drafter)):
            return st.drafter
        fits = [w for w in self.drafters if experts[0] in self._hosted(w)]
        if not fits:
            return st.drafter
        choice = _least_loaded(fits, collections.Counter(s.drafter for s in self.active.values()))
        pipe.xadd(self.keys.draft(st.drafter), entry(DraftClose(st.rid)), maxlen=defaults.STREAM_MAXLEN,
                  approximate=True)
        log.info("request %s: lead drafter moves from %s to %s (hosts %s)", st.rid, st.drafter, choice, experts[0])
        self.counters["drafter_moves"] += 1
        st.drafter, st.known = choice, 0
        return choice

    def _peers_for(self, st: Active, lead: str | None, experts: list[str],
                   weights: list[float]) -> tuple[list[str], list[float], dict[str, str]]:
        """The worker to ask for each chosen expert the lead does not host (sticky per request while it
        lives); experts no live worker hosts are left out."""
        own = set(self._hosted(lead))
        load = collections.Counter(w for s in self.active.values() for w in s.peers.values())
        peers: dict[str, str] = {}
        for e in experts:
            if e in own:
                continue
            if st.peers.get(e) in self.drafters and e in self._hosted(st.peers[e]):
                peers[e] = st.peers[e]
                continue
            fits = [w for w in self.drafters if w != lead and e in self._hosted(w)]
            if fits:
                peers[e] = _least_loaded(fits, load)
        st.peers = peers
        keep = [i for i, e in enumerate(experts) if e in own or e in peers]
        return [experts[i] for i in keep], [weights[i] for i in keep] if weights else [], peers

    def _jobs_sent(self, jobs: list[tuple[Active, int]]) -> None:
        now = time.monotonic()
        for st, epoch in jobs:
            st.waiting_epoch = epoch
            st.known = epoch
            st.job_sent = now

    def _refresh_drafters(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._drafters_at > defaults.HEARTBEAT_INTERVAL_S:
            self.drafters = self.streams.live_workers("drafter")
            self._drafters_at = now

    def _drafter_for(self, st: Active) -> str | None:
        """The request's drafter worker: sticky while alive, else the least loaded one that fits."""
        if st.drafter in self.drafters:
            return st.drafter
        wanted = [st.msg.drafter] if st.msg.drafter else st.msg.drafters
        fits = [w for w in self.drafters if not wanted or set(wanted) & set(self._hosted(w))]
        if not fits:
            if st.drafter is not None:
                log.info("request %s lost drafter %s; decoding alone until one is back", st.rid, st.drafter)
                st.drafter = None
            return None
        choice = _least_loaded(fits, collections.Counter(s.drafter for s in self.active.values()))
        if st.drafter is not None:
            log.info("request %s moves from drafter %s to %s", st.rid, st.drafter, choice)
            self.counters["drafter_moves"] += 1
        st.drafter = choice
        st.known = 0
        return choice

    # -- maintenance ----------------------------------------------------------------------------------
    def maintenance(self, now: float, admit: bool) -> None:
        self.steering.control = self.control.current()
        if now >= self._cancels_at:
            self._cancels_at = now + defaults.CANCEL_POLL_S
            self._poll_cancels()
        self._check_deadlines()
        if now >= self._refresh_at and self.active:
            self._refresh_at = now + self.settings.admission_refresh_s
            self._refresh_ownership()
        if admit and now >= self._reclaim_at:
            self._reclaim_at = now + self.settings.reclaim_interval_s
            self._reclaim()
        stuck = [st for st in self.active.values() if st.drafter is not None and st.drafter not in self.drafters]
        if stuck:
            self._refresh_drafters(force=True)

    def _refresh_ownership(self) -> None:
        """Keep our admission entries fresh; drop requests another verifier has taken over meanwhile
        (we were cut off long enough to look dead), so exactly one verifier serves each request."""
        sts = list(self.active.values())
        pipe = self.streams.r.pipeline(transaction=False)
        for st in sts:
            pipe.xpending_range(self.keys.requests, VERIFIERS_GROUP, min=st.entry_id, max=st.entry_id, count=1)
        owners = pipe.execute()
        mine, lost = [], []
        for st, rows in zip(sts, owners):
            if rows and rows[0]["consumer"].decode() != self.me:
                lost.append(st)
            else:
                mine.append(st.entry_id)
        if mine:
            # A min-idle of half the refresh period never steals an entry another verifier claimed just now.
            min_idle = int(self.settings.admission_refresh_s * 500)
            self.streams.r.xclaim(self.keys.requests, VERIFIERS_GROUP, self.me, min_idle, mine, justid=True)
        if lost:
            log.warning("%d requests were taken over by other verifiers; letting them go", len(lost))
            self.counters["lost_ownership"] += len(lost)
            self.engine.release([st.rid for st in lost if st.rid in self.engine.seqs])
            for st in lost:
                self.active.pop(st.rid, None)

    def _poll_cancels(self) -> None:
        if self.cancel_cursor == "$":
            last = self.streams.r.xrevrange(self.keys.cancel, count=1)
            self.cancel_cursor = last[0][0].decode() if last else "0-0"
        reply = self.streams.r.xread({self.keys.cancel: self.cancel_cursor}, count=1000)
        if not reply:
            return
        cancelled = []
        for eid, fields in reply[0][1]:
            self.cancel_cursor = eid.decode()
            try:
                msg = decode_entry(fields, (Cancel,), self.vocab)
            except ProtocolError as exc:
                log.warning("ignoring a malformed cancellation %s: %s", eid, exc.reason)
                continue
            if msg.request_id in self.active:
                cancelled.append(self.active[msg.request_id])
        if cancelled:
            self._end(cancelled, FinishReason.CANCELLED)

    def _check_deadlines(self) -> None:
        wall = now_ms()
        late = [st for st in self.active.values() if st.msg.deadline_ms is not None and wall > st.msg.deadline_ms]
        if late:
            self._end(late, FinishReason.TIMEOUT)

    def _end(self, sts: list[Active], reason: FinishReason) -> None:
        pipe = self.streams.r.pipeline(transaction=True)
        for st in sts:
            self._finish_now(pipe, st, reason)
        pipe.execute()
        self._release(sts)

    def _reclaim(self) -> None:
        """Take over admission entries whose owner is dead; dead-letter those delivered too often."""
        ttl = int(self.settings.reclaim_interval_s * 1000)
        if not self.streams.singleton("reclaim", ttl, self.me):
            return
        pending = self.streams.r.xpending_range(
            self.keys.requests, VERIFIERS_GROUP, min="-", max="+", count=1000,
            idle=int(self.settings.reclaim_min_idle_s * 1000),
        )
        if not pending:
            return
        live = set(self.streams.live_workers("verifier"))
        orphans = [p for p in pending if p["consumer"].decode() not in live]
        if not orphans:
            return
        room = self.settings.max_active - len(self.active)
        claim, poison = [], []
        for p in orphans:
            if p["times_delivered"] >= self.settings.max_deliveries:
                poison.append(p["message_id"])
            elif len(claim) < room:
                claim.append(p["message_id"])
        for eid in poison:
            self._poison(eid)
        if claim:
            got = self.streams.r.xclaim(self.keys.requests, VERIFIERS_GROUP, self.me,
                                        int(self.settings.reclaim_min_idle_s * 1000), claim)
            got = [(eid, fields) for eid, fields in got if fields]
            if got:
                log.info("reclaimed %d requests from dead verifiers", len(got))
                self.counters["reclaimed"] += len(got)
                self.admit(got)

    def _poison(self, eid: bytes) -> None:
        rows = self.streams.r.xrange(self.keys.requests, eid, eid)
        fields = rows[0][1] if rows else {}
        reason = f"delivered {self.settings.max_deliveries}+ times without finishing"
        try:
            msg = decode_entry(fields, (GenerationRequest,), self.vocab)
        except ProtocolError:
            msg = None
        if msg is not None:
            pipe = self.streams.r.pipeline(transaction=True)
            self._finish_with_error(pipe, msg, eid, self._next_chunk_seq(msg.request_id), 0, reason, "server_error")
            pipe.execute()
        self.streams.dead_letter(self.keys.requests, VERIFIERS_GROUP, eid, fields, reason, self.me)
        self.counters["dead_lettered"] += 1

    def _next_chunk_seq(self, rid: str) -> int:
        chunks = self._read_chunks(rid)
        return max((c.seq for c in chunks), default=-1) + 1
