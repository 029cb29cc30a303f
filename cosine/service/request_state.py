"""What a verifier knows about one request it owns, in four parts: the request itself, what of its output
has been written, its drafting (which drafter worker, what that worker was told, the job in flight) and its
counters for the final stats."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from cosine.broker import entry_ms
from cosine.engine.sequence import Sequence
from cosine.policy.steering import RequestSteer
from cosine.protocol import Draft, GenerationRequest
from cosine.service.text import TextStream


@dataclass
class OutputCursor:
    """How far the request's output stream is written: chunks, tokens and characters sent."""

    chunk_seq: int = 0  # the next chunk's sequence number
    sent: int = 0  # output tokens already written
    first_token_ms: int | None = None  # wall clock when this verifier wrote the first token (not when resumed)
    text: TextStream = field(default_factory=TextStream)


@dataclass
class Drafting:
    """The request's drafting: the worker drafting it, what it has been told and the job in flight."""

    steer: RequestSteer
    worker: str | None = None  # the drafter worker (with fusion across workers: the lead)
    peers: dict[str, str] = field(default_factory=dict)  # fusion across workers: expert -> the worker asked
    known: int = 0  # committed tokens the worker has been sent
    k: int = 0  # positions asked for in the job in flight
    waiting_epoch: int | None = None  # the committed length the job in flight was built on
    job_sent: float = 0.0  # monotonic time the job in flight was sent
    draft: Draft | None = None  # a draft that arrived for the current epoch, not verified yet
    plain: bool = False  # the next round is a plain target step (no job sent)
    bets: list[Draft] = field(default_factory=list)  # drafts sent ahead for epochs not reached yet

    @property
    def waiting(self) -> bool:
        """A job is out and its draft has not arrived."""
        return self.draft is None and self.worker is not None and self.waiting_epoch is not None and not self.plain


@dataclass
class RequestCounters:
    """What the request's final stats report besides the engine's speculation counters."""

    draft_ms: float = 0.0
    verify_s: float = 0.0
    stale: int = 0
    late: int = 0
    resyncs: int = 0
    lookahead_hits: int = 0
    drafters_used: set[str] = field(default_factory=set)


@dataclass
class RequestState:
    msg: GenerationRequest
    entry_id: bytes  # its admission entry, pending for this verifier until the request ends
    seq: Sequence
    admitted_ms: int
    drafting: Drafting
    output: OutputCursor = field(default_factory=OutputCursor)
    counters: RequestCounters = field(default_factory=RequestCounters)

    @property
    def rid(self) -> str:
        return self.msg.request_id

    @property
    def enqueued_ms(self) -> int:
        """When the request was queued: its admission entry's id, stamped by the broker's clock."""
        return entry_ms(self.entry_id)


def request_seed(msg: GenerationRequest) -> int:
    """The request's sampling seed; derived from its id when not given, so a reclaimed request keeps it."""
    if msg.params.seed is not None:
        return msg.params.seed
    return int.from_bytes(hashlib.blake2b(msg.request_id.encode(), digest_size=8).digest(), "little") >> 1
