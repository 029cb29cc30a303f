"""Fusion across drafter workers: the two ends of the per-depth candidate exchange.

With the verifier's ``--cross-process-fusion``, a request's cooperating experts may be hosted by several
drafter workers. The worker that gets the draft job *leads*: it drafts in lockstep as usual
(:class:`cosine.engine.fused_drafter.FusedDrafter`) and, per depth, asks the workers hosting the other
experts for their candidates (:class:`RedisRemoteExperts`, a :class:`VoteAsk` per request and expert on
``ask:{peer}``); each worker answers asks from a thread of its own (:class:`VoteServer`, a :class:`Vote` on
``votes:{lead}``), so two leads waiting on each other never deadlock. A lockstep draft of ``k`` positions
costs ``k`` round trips through Redis; the lead sends its asks before its own forwards and collects after
them, so a round trip overlaps local work. An answer that misses :data:`defaults.VOTE_TIMEOUT_MS` drops its
expert from that draft (a weaker draft, never a wrong output).

Asks carry only the tokens a peer does not know yet: ``base`` tokens are assumed from this lead's earlier
asks, with a CRC of them so a peer that missed an ask answers ``resync`` instead of drafting from the
wrong prefix. Both streams are plain (no group) and trimmed: an ask or a vote that is lost costs one
timeout. Malformed entries go to the dead-letter stream. A peer forgets a request's rows after
``idle_evict_s`` without asks (leads do not send closes to peers).
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from array import array
from contextlib import AbstractContextManager
from dataclasses import dataclass

from cosine import defaults
from cosine.broker import RedisSettings, Streams, connect
from cosine.engine.draft_model import Drafter, common_prefix
from cosine.keys import Keys
from cosine.protocol import ProtocolError, Vote, VoteAsk, decode_entry
from cosine.service.run_loop import run_forever

log = logging.getLogger(__name__)


def prefix_check(tokens: list[int], n: int) -> int:
    """CRC32 of the first ``n`` tokens: the lead and the peer compare what ``base`` stands for."""
    return zlib.crc32(array("q", tokens[:n]).tobytes()) if n else 0


def _decoded(streams: Streams, stream: str, entries: list, kind: type, vocab: int, origin: str) -> list:
    """The entries' messages of type ``kind``; a malformed entry goes to the dead-letter stream (no group)."""
    out = []
    for eid, fields in entries:
        try:
            out.append(decode_entry(fields, (kind,), vocab))
        except ProtocolError as exc:
            streams.dead_letter(stream, None, eid, fields, exc.reason, origin)
    return out


@dataclass
class _AskedRows:
    """The tokens a lead has sent this peer for one request and expert (its ``base`` refers to them)."""

    tokens: list[int]
    seen: float


class VoteServer(threading.Thread):
    """Answers other leads' asks with this worker's experts, on a connection and thread of its own.

    ``lock`` is the worker's model lock: the main thread holds it per forward, never while it waits."""

    def __init__(self, redis_settings: RedisSettings, worker_id: str, drafters: dict[str, Drafter],
                 lock: AbstractContextManager, vocab: int, idle_evict_s: float = defaults.DRAFTER_IDLE_EVICT_S,
                 block_ms: int = defaults.VOTE_BLOCK_MS) -> None:
        super().__init__(name=f"votes-{worker_id}", daemon=True)
        self.keys = Keys(redis_settings.prefix)
        self.streams = Streams(connect(redis_settings), self.keys)
        self.worker_id = worker_id
        self.drafters = drafters
        self.lock = lock
        self.vocab = vocab
        self.idle_evict_s = idle_evict_s
        self.block_ms = block_ms
        self.stream = self.keys.ask(worker_id)
        self.known: dict[tuple[str, str, str], _AskedRows] = {}  # (request, lead, expert) -> tokens it sent
        self.served = 0
        self.resyncs = 0
        self._stop_event = threading.Event()
        self.ready = threading.Event()  # set once it reads: asks added from then on are answered
        self.cursor: bytes | str = "$"

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        run_forever(f"vote server {self.worker_id}", self._stop_event, self.step, on_start=self.start_reading)

    def start_reading(self) -> None:
        """Read only what arrives from now on: asks older than this are for rounds already over."""
        self.cursor = self.streams.latest_id(self.stream)
        self.ready.set()

    def step(self) -> None:
        entries = self.streams.read_after(self.stream, self.cursor, 256, self.block_ms)
        if entries:
            self.cursor = entries[-1][0]
            self.handle(entries)
        self.evict_idle()

    def handle(self, entries: list) -> None:
        """Answer a batch of asks: one forward per expert over every request it is asked about."""
        now = time.monotonic()
        asks: dict[tuple[str, str], VoteAsk] = {}  # (expert, request) -> the newest ask
        replies: list[Vote] = []
        for ask in _decoded(self.streams, self.stream, entries, VoteAsk, self.vocab, self.worker_id):
            asks[(ask.expert, ask.request_id)] = ask
        groups: dict[str, dict[str, list[int]]] = {}  # expert -> request -> tokens
        for (expert, rid), ask in asks.items():
            key = (rid, ask.lead, expert)
            have = self.known.get(key)
            if ask.base == 0:
                tokens = list(ask.tokens)
            elif have is not None and len(have.tokens) >= ask.base and \
                    prefix_check(have.tokens, ask.base) == ask.check:
                tokens = have.tokens[: ask.base] + ask.tokens
            else:
                self.resyncs += 1
                self.known.pop(key, None)
                replies.append(Vote(rid, self.worker_id, ask.ticket, expert, resync=True))
                continue
            self.known[key] = _AskedRows(tokens, now)
            if expert in self.drafters:
                groups.setdefault(expert, {})[rid] = tokens
            else:  # not hosted here (any more): an empty answer, so the lead does not wait for it
                replies.append(Vote(rid, self.worker_id, ask.ticket, expert))
        for expert, seqs in groups.items():
            widths = {rid: asks[(expert, rid)].width for rid in seqs}
            try:
                with self.lock:
                    proposed = self.drafters[expert].propose(seqs, widths)
            except Exception:
                log.exception("vote server %s: %s failed on %d asks", self.worker_id, expert, len(seqs))
                with self.lock:
                    self.drafters[expert].release(list(seqs))
                proposed = {}
            for rid in seqs:
                cands = proposed.get(rid, [])
                replies.append(Vote(rid, self.worker_id, asks[(expert, rid)].ticket, expert,
                                    [t for t, _ in cands], [min(1.0, max(0.0, p)) for _, p in cands]))
        pipe = self.streams.pipeline()
        for vote in replies:
            self.streams.add(self.keys.votes(asks[(vote.expert, vote.request_id)].lead), vote, pipe)
        pipe.execute()
        self.served += len(replies)

    def evict_idle(self) -> None:
        cutoff = time.monotonic() - self.idle_evict_s
        old = [key for key, k in self.known.items() if k.seen < cutoff]
        for key in old:
            del self.known[key]
        gone = {rid for rid, _, _ in old} - {rid for rid, _, _ in self.known}
        if gone:
            with self.lock:
                for d in self.drafters.values():
                    d.release(sorted(gone))


class RedisRemoteExperts:
    """The lead's side (a :class:`cosine.engine.fused_drafter.RemoteExperts`): asks peers, collects votes.

    Used by the worker's main thread only; ``route`` names, per request, the worker hosting each remote
    expert before a draft."""

    def __init__(self, streams: Streams, worker_id: str, vocab: int,
                 timeout_ms: float = defaults.VOTE_TIMEOUT_MS) -> None:
        self.streams = streams
        self.keys = streams.keys
        self.worker_id = worker_id
        self.vocab = vocab
        self.timeout_ms = timeout_ms
        self.stream = self.keys.votes(worker_id)
        self.peers: dict[str, dict[str, str]] = {}  # request -> expert -> worker
        self.sent: dict[tuple[str, str, str], list[int]] = {}  # (worker, request, expert) -> tokens sent
        self.ticket = 0
        self.pending: set[tuple[str, str]] = set()  # (expert, request) asked this depth, not answered
        self._last: bytes | str | None = None
        # Counters (the network cost of fusion across workers).
        self.rounds = 0
        self.asks = 0
        self.wait_s = 0.0
        self.timeouts = 0
        self.resyncs = 0

    def route(self, peers: dict[str, dict[str, str]]) -> None:
        self.peers = peers

    def forget(self, request_id: str) -> None:
        for key in [k for k in self.sent if k[1] == request_id]:
            del self.sent[key]

    def ask(self, asks: dict[str, dict[str, list[int]]], widths: dict[str, int]) -> None:
        if self._last is None:  # votes older than the first ask answer nobody here
            self._last = self.streams.latest_id(self.stream)
        self.ticket += 1
        self.pending = set()
        pipe = self.streams.pipeline()
        for expert, seqs in asks.items():
            for rid, tokens in seqs.items():
                peer = self.peers.get(rid, {}).get(expert)
                if peer is None:
                    continue  # nobody to ask: missing from the answers
                prev = self.sent.get((peer, rid, expert))
                base = min(common_prefix(prev, tokens), len(tokens) - 1) if prev is not None else 0
                ask = VoteAsk(rid, self.worker_id, self.ticket, expert, base, tokens[base:], widths.get(rid, 1),
                              check=prefix_check(tokens, base))
                self.streams.add(self.keys.ask(peer), ask, pipe)
                self.sent[(peer, rid, expert)] = list(tokens)
                self.pending.add((expert, rid))
        if self.pending:
            pipe.execute()
            self.asks += len(self.pending)

    def collect(self) -> dict[str, dict[str, list[tuple[int, float]]]]:
        got: dict[str, dict[str, list[tuple[int, float]]]] = {}
        if not self.pending:
            return got
        t0 = time.perf_counter()
        deadline = t0 + self.timeout_ms / 1000
        while self.pending:
            left_ms = int((deadline - time.perf_counter()) * 1000)
            if left_ms < 1:
                break
            entries = self.streams.read_after(self.stream, self._last, 1024, left_ms)
            if entries:
                self._last = entries[-1][0]
            for vote in _decoded(self.streams, self.stream, entries, Vote, self.vocab, self.worker_id):
                key = (vote.expert, vote.request_id)
                if vote.ticket != self.ticket or key not in self.pending:
                    continue  # an answer to a depth already given up on
                self.pending.discard(key)
                if vote.resync:
                    self.resyncs += 1
                    self.sent.pop((vote.worker, vote.request_id, vote.expert), None)
                elif vote.tokens:
                    got.setdefault(vote.expert, {})[vote.request_id] = list(zip(vote.tokens, vote.probs))
        self.timeouts += len(self.pending)
        for expert, rid in self.pending:  # it may never have seen this ask: start it afresh next time
            for peer in {w for (w, r, e) in self.sent if r == rid and e == expert}:
                self.sent.pop((peer, rid, expert), None)
        self.pending = set()
        self.rounds += 1
        self.wait_s += time.perf_counter() - t0
        return got

    def stats(self) -> dict:
        return {"vote_rounds": self.rounds, "vote_asks": self.asks, "vote_wait_s": round(self.wait_s, 4),
                "vote_timeouts": self.timeouts, "vote_resyncs": self.resyncs}
