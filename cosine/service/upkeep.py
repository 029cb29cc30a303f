"""A verifier's upkeep between passes: cancellations, deadlines, keeping its admission entries fresh (and
letting go of requests another verifier took over), and the reclaim sweep that hands a dead verifier's
requests to a live one, dead-lettering those delivered too often, and forgets workers long dead.

The sweep runs on one verifier at a time (a ``SET NX PX`` guard per interval); liveness comes from
heartbeats, not from how long an entry has been idle.
"""

from __future__ import annotations

import logging

from cosine import defaults
from cosine.broker import Entry, Streams, wall_ms
from cosine.engine.sequence import FinishReason
from cosine.keys import VERIFIERS_GROUP
from cosine.ownership import may_act
from cosine.protocol import Cancel, GenerationRequest, ProtocolError, decode_entry
from cosine.service.requests import RequestBook
from cosine.service.verifier_metrics import VerifierMetrics

log = logging.getLogger(__name__)


class Upkeep:
    def __init__(self, streams: Streams, book: RequestBook, metrics: VerifierMetrics, me: str, max_active: int,
                 refresh_s: float = defaults.ADMISSION_REFRESH_S, reclaim_s: float = defaults.RECLAIM_INTERVAL_S,
                 reclaim_min_idle_s: float = defaults.RECLAIM_MIN_IDLE_S,
                 max_deliveries: int = defaults.MAX_DELIVERIES) -> None:
        self.streams = streams
        self.keys = streams.keys
        self.book = book
        self.metrics = metrics
        self.me = me
        self.max_active = max_active
        self.refresh_s = refresh_s
        self.reclaim_s = reclaim_s
        self.reclaim_min_idle_ms = int(reclaim_min_idle_s * 1000)
        self.max_deliveries = max_deliveries
        self._refresh_at = self._reclaim_at = self._cancels_at = 0.0
        self._cancel_cursor: bytes | str | None = None

    def run(self, now: float, admitting: bool, held: frozenset[bytes] = frozenset()) -> list[Entry]:
        """Everything due at monotonic time ``now``; returns the entries reclaimed from dead verifiers and this
        verifier's own strays (:meth:`strays`; ``held``: the admission entries read but not admitted yet), for
        the caller to admit (none while it drains)."""
        if now >= self._cancels_at:
            self._cancels_at = now + defaults.CANCEL_POLL_S
            self.cancellations()
        self.deadlines()
        if now >= self._refresh_at and self.book.active:
            self._refresh_at = now + self.refresh_s
            self.refresh_ownership()
        if admitting and now >= self._reclaim_at:
            self._reclaim_at = now + self.reclaim_s
            return self.strays(held) + self.reclaim()
        return []

    def strays(self, held: frozenset[bytes]) -> list[Entry]:
        """Admission entries delivered to this verifier that it neither serves nor holds: a read whose reply
        was lost (a timeout, a dropped connection) leaves its entries pending for a live consumer, which no
        reclaim sweep takes, so they are read again here."""
        known = held | self.book.waiting_ids() | {st.entry_id for st in self.book.active.values()}
        lost = [(eid, f) for eid, f in self.streams.own_pending(self.keys.requests, VERIFIERS_GROUP, self.me)
                if eid not in known]
        if lost:
            log.warning("%d admission entries were delivered to this verifier but never seen; admitting them",
                        len(lost))
            self.metrics.counters["strays"] += len(lost)
        return lost

    def cancellations(self) -> None:
        """End the requests named on the cancel stream since the last look (read without a group: every
        verifier sees every notice and acts on its own requests)."""
        if self._cancel_cursor is None:
            self._cancel_cursor = self.streams.latest_id(self.keys.cancel)
        entries = self.streams.read_after(self.keys.cancel, self._cancel_cursor, 1000)
        cancelled = []
        for eid, fields in entries:
            self._cancel_cursor = eid
            try:
                msg = decode_entry(fields, (Cancel,), self.book.vocab)
            except ProtocolError as exc:
                log.warning("ignoring a malformed cancellation %s: %s", eid, exc.reason)
                continue
            if not may_act(msg.request_id, msg.owner):
                log.warning("ignoring a cancellation of %s without its owner's secret", msg.request_id)
                self.metrics.counters["cancels_refused"] += 1
                continue
            if msg.request_id in self.book.active:
                cancelled.append(self.book.active[msg.request_id])
            for waiting in self.book.waiting:  # ended when next tried (soon: a cancelled one is due at once)
                waiting.cancelled |= waiting.rid == msg.request_id
        if cancelled:
            self.book.end(cancelled, FinishReason.CANCELLED)

    def deadlines(self) -> None:
        wall = wall_ms()
        late = [st for st in self.book.active.values()
                if st.msg.deadline_ms is not None and wall > st.msg.deadline_ms]
        if late:
            self.book.end(late, FinishReason.TIMEOUT)

    def refresh_ownership(self) -> None:
        """Keep our admission entries fresh; drop requests another verifier has taken over meanwhile (we were
        cut off long enough to look dead), so exactly one verifier serves each request."""
        sts = list(self.book.active.values())
        owners = self.streams.owners(self.keys.requests, VERIFIERS_GROUP, [st.entry_id for st in sts])
        lost = [st for st, owner in zip(sts, owners) if owner is not None and owner != self.me]
        mine = [st.entry_id for st, owner in zip(sts, owners) if owner is None or owner == self.me]
        # A min-idle of half the refresh period never steals an entry another verifier claimed just now.
        self.streams.touch(self.keys.requests, VERIFIERS_GROUP, self.me, mine, int(self.refresh_s * 500))
        if lost:
            log.warning("%d requests were taken over by other verifiers; letting them go", len(lost))
            self.metrics.counters["lost_ownership"] += len(lost)
            self.book.drop(lost)

    def reclaim(self) -> list[Entry]:
        """Take over admission entries whose owner is dead; dead-letter those delivered too often."""
        if not self.streams.singleton("reclaim", int(self.reclaim_s * 1000), self.me):
            return []
        self.streams.forget_dead_workers()
        pending = self.streams.idle_pending(self.keys.requests, VERIFIERS_GROUP, self.reclaim_min_idle_ms)
        if not pending:
            return []
        live = set(self.streams.live_workers("verifier"))
        orphans = [p for p in pending if p["consumer"].decode() not in live]
        room = self.max_active - len(self.book.active) - len(self.book.waiting)
        poison = [p["message_id"] for p in orphans if p["times_delivered"] >= self.max_deliveries]
        claim = [p["message_id"] for p in orphans if p["times_delivered"] < self.max_deliveries][: max(0, room)]
        for eid in poison:
            self.poison(eid)
        got = self.streams.claim(self.keys.requests, VERIFIERS_GROUP, self.me, claim, self.reclaim_min_idle_ms)
        if got:
            log.info("reclaimed %d requests from dead verifiers", len(got))
            self.metrics.counters["reclaimed"] += len(got)
        return got

    def poison(self, eid: bytes) -> None:
        """An entry delivered too often: its client gets an error, the entry goes to the dead-letter stream."""
        fields = next((f for _, f in self.streams.entries(self.keys.requests, eid, eid)), {})
        reason = f"delivered {self.max_deliveries}+ times without finishing"
        try:
            msg = decode_entry(fields, (GenerationRequest,), self.book.vocab)
        except ProtocolError:
            msg = None
        if msg is not None:
            pipe = self.streams.transaction()
            self.book.refuse(pipe, msg, eid, reason, "server_error",
                             self.book.output.next_seq(msg.request_id, msg.owner))
            pipe.execute()
        self.streams.dead_letter(self.keys.requests, VERIFIERS_GROUP, eid, fields, reason, self.me)
        self.metrics.counters["dead_lettered"] += 1
