"""The requests a verifier owns: admitting them (decode, resume what an earlier owner wrote, prefill the
target), ending them (the final chunk, the acknowledgement of their admission entry, their drafter told)
and letting them go.

A request's admission entry stays pending for its owner until the request ends: a restart re-admits it, a
dead owner's entries are reclaimed by another verifier, which resumes from the output stream.

With a KV budget (the engine's ``capacity_tokens``) a request whose prompt and ``max_new_tokens`` could never
fit is refused; one that does not fit beside the requests held waits (:attr:`RequestBook.waiting`, in order,
its entry still pending for this verifier) until requests end and make room.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from cosine.broker import Entry, Streams, wall_ms
from cosine.engine.prompting import encode_chat, encode_text
from cosine.engine.sequence import FinishReason, Sequence
from cosine.errors import InvalidParameterError
from cosine.keys import VERIFIERS_GROUP
from cosine.ownership import may_act
from cosine.policy.steering import Steering
from cosine.protocol import DraftClose, GenerationRequest, ProtocolError, decode_entry, peek_request_id
from cosine.service.output import OutputWriter
from cosine.service.request_state import Drafting, OutputCursor, RequestState, request_seed
from cosine.service.verifier_metrics import VerifierMetrics
from cosine.units import human_bytes

log = logging.getLogger(__name__)


@dataclass
class Waiting:
    """A request read and valid, not admitted yet: its KV reservation does not fit beside those held."""

    entry: Entry
    rid: str
    need: int  # token slots it reserves
    deadline_ms: int | None
    cancelled: bool = False  # a cancel notice came while it waited: admitting it ends it at once


class RequestBook:
    def __init__(self, streams: Streams, engine, tokenizer, output: OutputWriter, steering: Steering,
                 metrics: VerifierMetrics, me: str, hosted: Callable[[], set[str]] = set) -> None:
        """``hosted()``: the drafter models live drafter workers host (empty: none known), against which a
        request's ``drafter``/``drafters`` are checked at admission."""
        self.streams = streams
        self.hosted = hosted
        self.keys = streams.keys
        self.engine = engine
        self.tokenizer = tokenizer
        self.output = output
        self.steering = steering
        self.metrics = metrics
        self.me = me
        self.vocab = engine.vocab_size
        self.active: dict[str, RequestState] = {}
        self.waiting: list[Waiting] = []  # oldest first; admitted in that order as room frees

    # -- admission ------------------------------------------------------------------------------------
    def admit(self, entries: list[Entry],
              before_prefill: Callable[[list[RequestState]], None] | None = None) -> list[RequestState]:
        """Decode, look up earlier output and cancellation (one round trip for all), ``before_prefill`` the
        requests about to be admitted, prefill; returns the requests now active. Malformed entries go to the
        dead-letter stream and their client is told."""
        pipe = self.streams.transaction()
        decoded: list[tuple[bytes, GenerationRequest]] = []
        for eid, fields in entries:
            try:
                msg = decode_entry(fields, (GenerationRequest,), self.vocab)
            except ProtocolError as exc:
                self.streams.dead_letter(self.keys.requests, VERIFIERS_GROUP, eid, fields, exc.reason, self.me)
                self.metrics.counters["dead_lettered"] += 1
                peeked = peek_request_id(fields)
                if peeked is not None and peeked[0] not in self.active:  # tell its client, not leave it waiting
                    self.output.reject(pipe, *peeked, exc.reason, "invalid_request")
                continue
            if not may_act(msg.request_id, msg.owner):  # another client's id: touch nothing of that request
                reason = "request_id: bound to another client (its owner secret does not match)"
                self.streams.dead_letter(self.keys.requests, VERIFIERS_GROUP, eid, fields, reason, self.me)
                self.metrics.counters["dead_lettered"] += 1
                self.metrics.counters["ownership_refused"] += 1
                continue
            held = self.active.get(msg.request_id)
            if held is None and all(m.request_id != msg.request_id for _, m in decoded):
                decoded.append((eid, msg))
            elif held is None or held.entry_id != eid:  # a second entry for a request already taken
                self._duplicate(pipe, msg.request_id, eid)
            # (else a re-delivery of the entry of a request this verifier serves: it is acknowledged at its end)
        earlier = self.streams.earlier_outputs([(msg.request_id, msg.owner) for _, msg in decoded])
        fresh = [st for (eid, msg), (rows, cancelled) in zip(decoded, earlier)
                 if (st := self._resume(pipe, msg, eid, rows, cancelled)) is not None]
        pipe.execute()
        fresh = self._within_budget(fresh, dict(entries))
        if fresh and before_prefill is not None:
            before_prefill(fresh)
        if fresh:
            fresh = self._prefill(fresh)
            for st in fresh:
                self.active[st.rid] = st
            self.metrics.counters["admitted"] += len(fresh)
        return fresh

    # -- the KV budget --------------------------------------------------------------------------------
    def _within_budget(self, sts: list[RequestState], fields: dict) -> list[RequestState]:
        """The requests whose KV reservations fit beside those held, in order; from the first that does not,
        the rest wait (ahead of those waiting already: they were taken from the front of the queue)."""
        fit: list[RequestState] = []
        wait: list[Waiting] = []
        for st in sts:
            if not wait and self.engine.fits(st.seq, [f.seq for f in fit]).now:
                fit.append(st)
            else:
                wait.append(Waiting((st.entry_id, fields[st.entry_id]), st.rid, self.engine.reservation(st.seq),
                                    st.msg.deadline_ms))
        if wait:
            self.waiting[:0] = wait
            self.metrics.counters["kv_waits"] += len(wait)
        return fit

    def due(self, wall: int) -> bool:
        """Whether a waiting request should be tried again: the first one fits now, or one was cancelled or
        is past its deadline (it ends without room)."""
        return bool(self.waiting) and (
            self.engine.fits_need(self.waiting[0].need).now
            or any(w.cancelled or (w.deadline_ms is not None and wall > w.deadline_ms) for w in self.waiting))

    def take_waiting(self, n: int, wall: int) -> list[Entry]:
        """The entries to try again: the first ``n`` waiting and every one cancelled or past its deadline."""
        take = [i for i, w in enumerate(self.waiting)
                if i < n or w.cancelled or (w.deadline_ms is not None and wall > w.deadline_ms)]
        chosen = set(take)
        entries = [self.waiting[i].entry for i in take]
        self.waiting = [w for i, w in enumerate(self.waiting) if i not in chosen]
        return entries

    def waiting_ids(self) -> frozenset[bytes]:
        return frozenset(w.entry[0] for w in self.waiting)

    def _check_budget(self, seq: Sequence) -> None:
        """Refuse a request whose KV reservation is more than the whole budget: it could never be served."""
        fit = self.engine.fits(seq)
        if fit.ever:
            return
        prompt = len(seq.prompt_ids)
        cap = fit.capacity
        per_slot = getattr(self.engine, "slot_bytes", None)  # None: told in token slots only
        size = (lambda slots: f" ({human_bytes(slots * per_slot)})") if per_slot else (lambda _: "")
        field = "prompt" if min(prompt + 1, self.engine.max_len) > cap else "max_new_tokens"
        raise InvalidParameterError(
            field, f"the prompt's {prompt} tokens plus max_new_tokens {seq.params.max_new_tokens} need {fit.need} KV "
                   f"token slots{size(fit.need)}; this verifier's KV budget holds {cap}{size(cap)}")

    def _prefill(self, sts: list[RequestState]) -> list[RequestState]:
        """Prefill ``sts`` in one batch; if that fails, each alone, and a request whose own prefill fails ends
        with an explicit error (its entry acknowledged, so no restart re-admits it): one bad request must
        not strand the others admitted with it. Returns the requests prefilled."""
        with self.metrics.timed("busy_s", "admit_s"):
            try:
                self.engine.admit([st.seq for st in sts])
                return sts
            except Exception:  # noqa: BLE001 - retried one by one below, each failure ends its request
                log.exception("prefill failed for %d requests; prefilling them one by one", len(sts))
                self.engine.release([st.rid for st in sts])
            done, failed = [], []
            for st in sts:
                try:
                    self.engine.admit([st.seq])
                    done.append(st)
                except Exception as exc:  # noqa: BLE001 - the request ends with the error, the worker goes on
                    log.exception("prefill failed for request %s", st.rid)
                    self.engine.release([st.rid])
                    failed.append((st, f"prefill failed: {type(exc).__name__}: {exc}"))
        if failed:
            pipe = self.streams.transaction()
            for st, error in failed:
                self._finish(pipe, st, FinishReason.ERROR, error, "server_error")
                self.metrics.counters["prefill_failed"] += 1
            pipe.execute()
        return done

    def _duplicate(self, pipe, request_id: str, eid: bytes) -> None:
        """Queue the acknowledgement of a second entry for a request already taken (a client's retried
        submit): the first entry's request is served once; this one is only dropped."""
        Streams.ack_delete(pipe, self.keys.requests, VERIFIERS_GROUP, [eid])
        self.metrics.counters["duplicate_requests"] += 1
        log.warning("request %s: dropped a second admission entry %s", request_id, eid)

    def _resume(self, pipe, msg: GenerationRequest, eid: bytes, rows: list[Entry],
                cancelled: bool) -> RequestState | None:
        """The request's state, resumed from what its output stream holds; None when it is over already."""
        earlier = self.output.recover(rows)
        if earlier.finished:
            Streams.ack_delete(pipe, self.keys.requests, VERIFIERS_GROUP, [eid])
            return None
        try:
            seq = Sequence(self._prompt_ids(msg), msg.params, seq_id=msg.request_id, seed=request_seed(msg))
            self.engine.validate(seq)
            self._check_budget(seq)
            self._check_drafters(msg)
        except InvalidParameterError as exc:
            self.refuse(pipe, msg, eid, str(exc), "invalid_request", earlier.next_seq, len(earlier.tokens))
            return None
        seq.output_ids = earlier.tokens
        st = RequestState(msg, eid, seq, wall_ms(), Drafting(self.steering.new()),
                          OutputCursor(earlier.next_seq, len(earlier.tokens)))
        st.output.text.emitted = earlier.emitted
        if earlier.tokens:
            self.metrics.counters["resumed"] += 1
            log.info("request %s resumed at %d committed tokens", msg.request_id, len(earlier.tokens))
        if cancelled:
            self._finish(pipe, st, FinishReason.CANCELLED)
            return None
        if msg.deadline_ms is not None and st.admitted_ms > msg.deadline_ms:
            self._finish(pipe, st, FinishReason.TIMEOUT)
            return None
        return st

    def _check_drafters(self, msg: GenerationRequest) -> None:
        """Refuse drafter models no live drafter worker hosts (a typo would otherwise decode as if unpinned).
        With no drafter worker known there is nothing to check against: the request decodes alone until
        one comes."""
        hosted = self.hosted()
        unknown = sorted({n for n in [msg.drafter, *msg.drafters] if n is not None} - hosted) if hosted else []
        if unknown:
            raise InvalidParameterError("drafter", f"no live drafter worker hosts {unknown}; hosted: {sorted(hosted)}")

    def _prompt_ids(self, msg: GenerationRequest) -> list[int]:
        if msg.prompt_ids is not None:
            return list(msg.prompt_ids)
        if msg.messages is not None:
            return encode_chat(self.tokenizer, msg.messages)
        return encode_text(self.tokenizer, msg.prompt)

    # -- ending ---------------------------------------------------------------------------------------
    def refuse(self, pipe, msg: GenerationRequest, eid: bytes, error: str, error_type: str, seq: int = 0,
               offset: int = 0) -> None:
        """Queue the end of a request this verifier will not serve: an error chunk, its entry acknowledged."""
        request_id = msg.request_id
        self.output.reject(pipe, request_id, msg.owner, error, error_type, seq, offset)
        Streams.ack_delete(pipe, self.keys.requests, VERIFIERS_GROUP, [eid])
        self.metrics.counters["rejected"] += 1
        log.warning("request %s rejected: %s", request_id, error)

    def close(self, pipe, st: RequestState) -> None:
        """Queue what follows a request's final chunk: its admission entry acknowledged, its drafter told."""
        Streams.ack_delete(pipe, self.keys.requests, VERIFIERS_GROUP, [st.entry_id])
        if st.drafting.worker is not None:
            self.streams.add(self.keys.draft(st.drafting.worker), DraftClose(st.rid), pipe)

    def _finish(self, pipe, st: RequestState, reason: FinishReason, error: str | None = None,
                error_type: str | None = None) -> None:
        st.seq.finish_reason = reason
        self.output.write(pipe, st, error, error_type)
        self.close(pipe, st)

    def end(self, sts: list[RequestState], reason: FinishReason, error: str | None = None,
            error_type: str | None = None) -> None:
        """End these requests now (cancelled, timed out, failed): final chunks, closes, release."""
        pipe = self.streams.transaction()
        for st in sts:
            self._finish(pipe, st, reason, error, error_type)
        pipe.execute()
        self.release(sts)

    def release(self, done: list[RequestState]) -> None:
        """Forget ended requests (their target KV rows too)."""
        self.engine.release([st.rid for st in done if st.rid in self.engine.seqs])
        for st in done:
            self.active.pop(st.rid, None)
            self.metrics.completed += 1
            reason = st.seq.finish_reason.value if st.seq.finish_reason else "none"
            self.metrics.counters[f"finish_{reason}"] += 1
            log.info("request %s finished (%s): %d tokens, acceptance length %.2f", st.rid, reason,
                     len(st.seq.output_ids), st.seq.stats.mean_acceptance_length)

    def drop(self, lost: list[RequestState]) -> None:
        """Let go of requests another verifier has taken over (nothing written: they are its now)."""
        self.engine.release([st.rid for st in lost if st.rid in self.engine.seqs])
        for st in lost:
            self.active.pop(st.rid, None)
