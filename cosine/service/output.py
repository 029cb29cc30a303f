"""Where a request's output is written: chunks on ``out:{request}`` as tokens commit, the last one with the
finish reason, the request's stats and the stream's expiry; and, for a request resumed by another verifier,
what its stream already holds.

Chunks carry sequence numbers and token offsets, so a reader drops what a replayed round or a takeover
writes twice. Every write is queued on the caller's MULTI pipeline, beside the acknowledgements it goes with.
"""

from __future__ import annotations

from dataclasses import dataclass

from cosine.broker import Entry, Streams, wall_ms
from cosine.engine.sequence import FinishReason
from cosine.engine.stopping import visible_text
from cosine.ownership import may_act, output_name
from cosine.protocol import Chunk, ProtocolError, decode_entry
from cosine.service.request_state import RequestState
from cosine.service.verifier_metrics import VerifierMetrics


@dataclass
class Recovered:
    """What a request's output stream already holds (written by an earlier owner)."""

    tokens: list[int]
    emitted: int  # characters of text sent
    next_seq: int
    finished: bool


class OutputWriter:
    def __init__(self, streams: Streams, tokenizer, vocab: int, me: str,
                 metrics: VerifierMetrics | None = None) -> None:
        self.streams = streams
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.me = me
        self.metrics = metrics or VerifierMetrics()

    def write(self, pipe, st: RequestState, error: str | None = None, error_type: str | None = None) -> None:
        """Queue the chunk holding everything committed since the last one (nothing when nothing is new); a
        finished request's chunk carries its finish reason and stats."""
        out, cur, finished = st.seq.output_ids, st.output, st.seq.finished
        text = cur.text.delta(st.seq, self.tokenizer, finished)
        if cur.sent == len(out) and not finished and not text:
            return
        chunk = Chunk(st.rid, cur.chunk_seq, cur.sent, out[cur.sent :], text, finished,
                      st.seq.finish_reason.value if finished else None, error, error_type, verifier=self.me)
        if finished:
            chunk.stats = self.stats(st)
        self.streams.add_output(pipe, chunk, st.msg.owner)
        self.metrics.counters["output_tokens"] += len(out) - cur.sent
        self._observe(st, finished and error is None)
        cur.chunk_seq += 1
        cur.sent = len(out)

    def resync(self, pipe, states: list[RequestState]) -> int:
        """After the broker was out of reach: queue again on ``pipe`` what the output streams of ``states`` lack
        of what this verifier wrote (a transaction cut off by the lost connection, or chunks a failed-over master
        had not passed on to its replica yet). The missing tokens go as one chunk numbered as the first one
        lost, so a reader that saw the lost chunks drops it and one that did not gets exactly their tokens and
        text; a finished request whose final chunk is missing gets it again. Returns the chunks queued."""
        states = [st for st in states if st.output.sent or st.seq.finished]
        queued = 0
        earlier = self.streams.earlier_outputs([(st.rid, st.msg.owner) for st in states])
        for st, (rows, _cancelled) in zip(states, earlier):
            have, cur = self.recover(rows), st.output
            if have.finished:
                continue
            if len(have.tokens) < cur.sent and have.next_seq < cur.chunk_seq:
                text = visible_text(st.seq, self.tokenizer)[have.emitted : cur.text.emitted]
                self.streams.add_output(pipe, Chunk(st.rid, have.next_seq, len(have.tokens),
                                                    st.seq.output_ids[len(have.tokens) : cur.sent], text, False,
                                                    None, None, None, verifier=self.me), st.msg.owner)
                queued += 1
            if st.seq.finished:
                self.write(pipe, st)  # everything is sent: the final chunk alone, with the stats
                queued += 1
        return queued

    def _observe(self, st: RequestState, completed: bool) -> None:
        """Latencies from the request's admission entry (the broker's clock at XADD): time to its first token
        (not for a request resumed past it), and at a clean end its latency and time per output token."""
        now, cur, n = wall_ms(), st.output, len(st.seq.output_ids)
        if cur.sent == 0 and n > 0 and cur.first_token_ms is None:
            cur.first_token_ms = now
            self.metrics.latency.observe("ttft", (now - st.enqueued_ms) / 1000)
        if completed:
            self.metrics.latency.observe("e2e", (now - st.enqueued_ms) / 1000)
            if cur.first_token_ms is not None and n > 1:
                self.metrics.latency.observe("tpot", (now - cur.first_token_ms) / 1000 / (n - 1))

    def reject(self, pipe, request_id: str, owner: str | None, error: str, error_type: str, seq: int = 0,
               offset: int = 0) -> None:
        """Queue a final error chunk for a request this verifier does not serve (invalid, or poison), on the
        output stream of whoever sent it: nothing for an owned id sent without its owner's secret."""
        if not may_act(request_id, owner):
            return
        self.streams.add_output(pipe, Chunk(request_id, seq, offset, [], "", True, FinishReason.ERROR.value, error,
                                            error_type, verifier=self.me), owner)

    def chunks(self, rows: list[Entry]) -> list[Chunk]:
        """Decoded output chunks of a stream, by sequence number, one per number."""
        by_seq: dict[int, Chunk] = {}
        for _eid, fields in rows:
            try:
                ch = decode_entry(fields, (Chunk,), self.vocab)
            except ProtocolError:
                continue
            by_seq.setdefault(ch.seq, ch)  # type: ignore[attr-defined]
        return [by_seq[k] for k in sorted(by_seq)]

    def recover(self, rows: list[Entry]) -> Recovered:
        """The tokens, text and chunk numbers an output stream already holds."""
        tokens: list[int] = []
        emitted, last_seq = 0, -1
        for ch in self.chunks(rows):
            if ch.finished:
                return Recovered(tokens, emitted, ch.seq + 1, True)
            if ch.offset <= len(tokens):
                tokens.extend(ch.token_ids[len(tokens) - ch.offset :])
            emitted += len(ch.text)
            last_seq = ch.seq
        return Recovered(tokens, emitted, last_seq + 1, False)

    def next_seq(self, request_id: str, owner: str | None) -> int:
        """The next chunk number of a request's output stream (read from Redis)."""
        return self.recover(self.streams.entries(self.streams.keys.out(output_name(request_id, owner)))).next_seq

    def stats(self, st: RequestState) -> dict:
        s = st.seq.stats.as_dict()
        c, created = st.counters, st.msg.created_ms
        s.update(
            {
                "prompt_tokens": len(st.seq.prompt_ids),
                "completion_tokens": len(st.seq.output_ids),
                "queue_ms": max(0, st.admitted_ms - created) if created else None,
                "drafting_ms": round(c.draft_ms, 3),
                "verifying_ms": round(c.verify_s * 1000, 3),
                "total_ms": wall_ms() - created if created else None,
                "stale_drafts": c.stale,
                "late_drafts": c.late,
                "resyncs": c.resyncs,
                "verifier": self.me,
                "drafter_workers": sorted(c.drafters_used),
                "lookahead_hits": c.lookahead_hits,
                "prompt_feature": st.drafting.steer.feature,
            }
        )
        return s
