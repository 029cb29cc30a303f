"""The wire protocol: msgpack messages with a schema version and a type, validated on read.

Every stream entry has one field, ``d``, holding a msgpack map ``{"v": version, "t": type, ...fields}``.
:func:`decode` checks the version, the type, every field's type and bounds, token ids against the
vocabulary and lengths against caps, and raises :class:`ProtocolError` with a reason; the caller moves
such an entry to the dead-letter stream and carries on. No pickle anywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

import msgpack

from cosine import protocol_fields as f
from cosine.keys import check_name
from cosine.protocol_fields import ProtocolError
from cosine.sampling_params import SamplingParams

SCHEMA_VERSION = 2  # 2: sampling parameters nested as ``params`` in requests and draft jobs
FIELD = b"d"

# -- messages -------------------------------------------------------------------------------------------
@dataclass
class Message:
    TYPE: ClassVar[str] = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def validate(cls, d: dict, vocab: int | None) -> Message:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class GenerationRequest(Message):
    """Client -> ``requests``: one generation request; ``params`` says how to decode it."""

    TYPE: ClassVar[str] = "request"
    request_id: str
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None  # chat: the verifier applies the tokenizer's chat template
    params: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0
    deadline_ms: int | None = None  # absolute, ms since the epoch
    drafter: str | None = None  # pin a drafter model by name
    drafters: list[str] = field(default_factory=list)  # restrict routing to these drafter models
    speculation: str = "adaptive"  # "adaptive" (the controller's choice), "off" (plain decoding) or "fixed"
    spec_k: int | None = None  # draft positions per round when speculation is "fixed"
    created_ms: int = 0
    client: str | None = None  # the submitting client's name (shown by the dashboard beside its requests)
    owner: str | None = None  # the owner secret (cosine/ownership.py): only it may run or cancel an owned id

    @classmethod
    def validate(cls, d: dict, vocab: int | None) -> GenerationRequest:
        prompt = f.optional(d.get("prompt"), f.string, "prompt", f.MAX_PROMPT_CHARS)
        prompt_ids = f.optional(d.get("prompt_ids"), f.token_ids, "prompt_ids", vocab, f.MAX_PROMPT_TOKENS)
        messages = f.optional(d.get("messages"), f.messages)
        if [prompt, prompt_ids, messages].count(None) != 2:
            raise ProtocolError("prompt: exactly one of prompt, prompt_ids and messages is required")
        if (prompt is not None and not prompt) or (prompt_ids is not None and not prompt_ids):
            raise ProtocolError("prompt: must not be empty")
        msg = cls(
            request_id=f.ident(d.get("request_id"), "request_id"),
            prompt=prompt,
            prompt_ids=prompt_ids,
            messages=messages,
            params=f.sampling(d.get("params", {}), vocab),
            priority=f.integer(d.get("priority", 0), "priority", -1000, 1000),
            deadline_ms=f.optional(d.get("deadline_ms"), f.integer, "deadline_ms", 0, 2**53),
            drafter=f.optional(d.get("drafter"), f.ident, "drafter"),
            drafters=f.names(d.get("drafters", []), "drafters"),
            speculation=f.string(d.get("speculation", "adaptive"), "speculation", 16),
            spec_k=f.optional(d.get("spec_k"), f.integer, "spec_k", 1, f.MAX_SPEC_K),
            created_ms=f.integer(d.get("created_ms", 0), "created_ms", 0, 2**53),
            client=f.optional(d.get("client"), f.ident, "client"),
            owner=f.optional(d.get("owner"), f.string, "owner", f.MAX_NAME_CHARS, allow_empty=False),
        )
        if msg.speculation not in f.SPECULATION_MODES:
            raise ProtocolError(f"speculation: {msg.speculation!r} is not one of {', '.join(f.SPECULATION_MODES)}")
        if (msg.speculation == "fixed") != (msg.spec_k is not None):
            raise ProtocolError("spec_k: required with speculation 'fixed' and only then")
        if msg.drafter is not None and msg.drafters and msg.drafter not in msg.drafters:
            raise ProtocolError(f"drafter: {msg.drafter!r} is pinned but not among drafters {msg.drafters}")
        return msg


@dataclass
class DraftJob(Message):
    """Verifier -> ``draft:{drafter}``: draft ``k`` positions after the request's committed tokens.

    The drafter is expected to know the first ``base`` committed tokens already (from earlier jobs);
    ``tokens`` are the ones after them, so ``epoch = base + len(tokens)`` is the committed length the
    draft must be built on. ``base == 0`` carries the whole sequence (first job, or a resync).
    """

    TYPE: ClassVar[str] = "draft_job"
    request_id: str
    verifier: str
    epoch: int
    base: int
    tokens: list[int]
    k: int
    width: int = 1
    # Drafter models to draft with, in lockstep with token fusion when several; empty = the worker's choice.
    experts: list[str] = field(default_factory=list)
    expert_weights: list[float] = field(default_factory=list)  # trust per expert in (0, 1]; empty = equal
    # Fusion across drafter workers: the worker to ask for each expert this one does not host.
    peers: dict[str, str] = field(default_factory=dict)
    sent_ms: int = 0
    # Sampled proposals (None: deterministic drafts): the request's sampling parameters, its seed set, to sample
    # the draft keyed by (seed, output ``position``) from the drafter's distribution truncated to its top
    # ``q_top`` tokens, whose probabilities travel back with the draft for rejection sampling.
    params: SamplingParams | None = None
    position: int = 0
    q_top: int = 0

    @property
    def sampled(self) -> bool:
        return self.params is not None

    @classmethod
    def validate(cls, d: dict, vocab: int | None) -> DraftJob:
        msg = cls(
            request_id=f.ident(d.get("request_id"), "request_id"),
            verifier=f.ident(d.get("verifier"), "verifier"),
            epoch=f.integer(d.get("epoch"), "epoch", 1, f.MAX_SEQUENCE),
            base=f.integer(d.get("base"), "base", 0, f.MAX_SEQUENCE),
            tokens=f.token_ids(d.get("tokens"), "tokens", vocab, f.MAX_SEQUENCE, allow_empty=False),
            k=f.integer(d.get("k"), "k", 1, f.MAX_SPEC_K),
            width=f.integer(d.get("width", 1), "width", 1, 16),
            experts=f.names(d.get("experts", []), "experts"),
            expert_weights=f.weights(d.get("expert_weights", [])),
            peers=f.peers(d.get("peers", {})),
            sent_ms=f.integer(d.get("sent_ms", 0), "sent_ms", 0, 2**53),
            params=f.optional(d.get("params"), f.sampling, vocab),
            position=f.integer(d.get("position", 0), "position", 0, f.MAX_NEW_TOKENS),
            q_top=f.integer(d.get("q_top", 0), "q_top", 0, f.MAX_Q_TOP),
        )
        p = msg.params
        if p is not None and (p.greedy or p.seed is None or msg.width != 1 or not msg.q_top):
            raise ProtocolError("params: sampled drafts need temperature > 0, a seed, width 1 and q_top > 0")
        if msg.expert_weights and len(msg.expert_weights) != len(msg.experts):
            raise ProtocolError("expert_weights: one weight per expert required")
        if msg.base + len(msg.tokens) != msg.epoch:
            raise ProtocolError(f"epoch {msg.epoch} != base {msg.base} + {len(msg.tokens)} tokens")
        return msg


@dataclass
class DraftClose(Message):
    """Verifier -> ``draft:{drafter}``: the request ended or moved; free its drafter state."""

    TYPE: ClassVar[str] = "draft_close"
    request_id: str

    @classmethod
    def validate(cls, d: dict, vocab: int | None) -> DraftClose:
        return cls(request_id=f.ident(d.get("request_id"), "request_id"))


@dataclass
class Draft(Message):
    """Drafter -> ``verify:{verifier}``: a draft tree built on ``epoch`` committed tokens.

    ``resync`` asks the verifier to resend the whole sequence (the drafter lost its state). A *bet* (sent
    unasked, drafted ahead) carries in ``assumed`` the last committed tokens it assumes (the tokens after those
    the drafter was last sent): the verifier takes it when the request's sequence ends with them at ``epoch``."""

    TYPE: ClassVar[str] = "draft"
    request_id: str
    drafter: str
    epoch: int
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    resync: bool = False
    job_sent_ms: int = 0
    draft_ms: float = 0.0
    # Sampled drafts: per node, the tokens and probabilities of the distribution it was sampled from.
    q_ids: list[list[int]] = field(default_factory=list)
    q_probs: list[list[float]] = field(default_factory=list)
    # Routing feedback: each drafting expert's own top-1 token and confidence per depth (given the fused
    # prefix), and the prompt feature the router's prior is keyed by (the expert with the lowest prompt loss).
    votes: dict[str, list[int]] = field(default_factory=dict)
    vote_conf: dict[str, list[float]] = field(default_factory=dict)
    feature: str = ""
    lookahead: bool = False  # served from a draft prepared ahead (the previous draft fully accepted)
    assumed: list[int] = field(default_factory=list)  # a bet: the committed tokens it assumes before epoch

    @classmethod
    def validate(cls, d: dict, vocab: int | None) -> Draft:
        tokens = f.token_ids(d.get("tokens", []), "tokens", vocab, f.MAX_DRAFT_NODES)
        parents = d.get("parents", [])
        if not isinstance(parents, list) or len(parents) != len(tokens):
            raise ProtocolError("parents: one parent per token required")
        for i, p in enumerate(parents):
            f.integer(p, "parents", -1, i - 1)
        confidences = d.get("confidences", [])
        if not isinstance(confidences, list) or len(confidences) != len(tokens):
            raise ProtocolError("confidences: one per token required")
        sources = d.get("sources", [])
        if not isinstance(sources, list) or len(sources) != len(tokens):
            raise ProtocolError("sources: one per token required")
        q_ids, q_probs = d.get("q_ids", []), d.get("q_probs", [])
        if not isinstance(q_ids, list) or not isinstance(q_probs, list) or len(q_ids) != len(q_probs):
            raise ProtocolError("q_ids/q_probs: expected two lists of the same length")
        if q_ids and len(q_ids) != len(tokens):
            raise ProtocolError("q_ids: one distribution per token required")
        for i, (ids, probs) in enumerate(zip(q_ids, q_probs)):
            f.token_ids(ids, "q_ids", vocab, f.MAX_Q_TOP, allow_empty=False)
            if not isinstance(probs, list) or len(probs) != len(ids):
                raise ProtocolError("q_probs: one probability per id required")
            for p in probs:
                f.number(p, "q_probs", 0.0, 1.0)
            if tokens[i] not in ids or probs[ids.index(tokens[i])] <= 0:
                raise ProtocolError("q_ids: a sampled token must have a positive probability")
        return cls(
            request_id=f.ident(d.get("request_id"), "request_id"),
            drafter=f.ident(d.get("drafter"), "drafter"),
            epoch=f.integer(d.get("epoch"), "epoch", 1, f.MAX_SEQUENCE),
            tokens=tokens,
            parents=parents,
            confidences=[f.number(c, "confidences", 0.0, 1.0) for c in confidences],
            sources=[f.ident(s, "sources") for s in sources],
            resync=f.boolean(d.get("resync", False), "resync"),
            job_sent_ms=f.integer(d.get("job_sent_ms", 0), "job_sent_ms", 0, 2**53),
            draft_ms=f.number(d.get("draft_ms", 0.0), "draft_ms", 0.0, 1e9),
            q_ids=q_ids,
            q_probs=q_probs,
            votes=f.votes(d.get("votes", {}), vocab),
            vote_conf=f.vote_conf(d.get("vote_conf", {})),
            feature=f.string(d.get("feature", ""), "feature", f.MAX_NAME_CHARS),
            lookahead=f.boolean(d.get("lookahead", False), "lookahead"),
            assumed=f.token_ids(d.get("assumed", []), "assumed", vocab, f.MAX_DRAFT_NODES + 1),
        )


@dataclass
class VoteAsk(Message):
    """Lead drafter -> ``ask:{peer}``: fusion across drafter workers, one depth of one request.

    The peer's ``expert`` is asked for its next-token candidates after the request's tokens so far (its
    committed tokens plus the spine drafted so far). The peer is expected to know the first ``base`` of
    them from this lead's earlier asks (``base == 0`` sends all); ``ticket`` pairs the answer with the ask.
    """

    TYPE: ClassVar[str] = "vote_ask"
    request_id: str
    lead: str
    ticket: int
    expert: str
    base: int
    tokens: list[int]
    width: int = 1
    check: int = 0  # CRC32 of the ``base`` tokens the peer is assumed to know (0 when base is 0)

    @classmethod
    def validate(cls, d: dict, vocab: int | None) -> VoteAsk:
        return cls(
            request_id=f.ident(d.get("request_id"), "request_id"),
            lead=f.ident(d.get("lead"), "lead"),
            ticket=f.integer(d.get("ticket"), "ticket", 0, 2**62),
            expert=f.ident(d.get("expert"), "expert"),
            base=f.integer(d.get("base"), "base", 0, f.MAX_SEQUENCE),
            tokens=f.token_ids(d.get("tokens"), "tokens", vocab, f.MAX_SEQUENCE, allow_empty=False),
            width=f.integer(d.get("width", 1), "width", 1, 16),
            check=f.integer(d.get("check", 0), "check", 0, 2**32 - 1),
        )


@dataclass
class Vote(Message):
    """Peer drafter -> ``votes:{lead}``: an expert's candidates (best first) for one :class:`VoteAsk`.

    ``resync`` asks the lead to send all the tokens next time (the peer does not know ``base`` of them)."""

    TYPE: ClassVar[str] = "vote"
    request_id: str
    worker: str
    ticket: int
    expert: str
    tokens: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    resync: bool = False

    @classmethod
    def validate(cls, d: dict, vocab: int | None) -> Vote:
        tokens, probs = f.candidates(d.get("tokens", []), d.get("probs", []), vocab)
        return cls(
            request_id=f.ident(d.get("request_id"), "request_id"),
            worker=f.ident(d.get("worker"), "worker"),
            ticket=f.integer(d.get("ticket"), "ticket", 0, 2**62),
            expert=f.ident(d.get("expert"), "expert"),
            tokens=tokens,
            probs=probs,
            resync=f.boolean(d.get("resync", False), "resync"),
        )


@dataclass
class Chunk(Message):
    """Verifier -> ``out:{request}``: tokens as they commit; the last chunk has ``finished`` set.

    ``seq`` numbers chunks from 0 and ``offset`` is the index of the chunk's first token in the output,
    so a reader drops duplicates (a replayed round, a reclaimed request) and notices gaps."""

    TYPE: ClassVar[str] = "chunk"
    request_id: str
    seq: int
    offset: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    error_type: str | None = None
    stats: dict | None = None
    verifier: str = ""

    @classmethod
    def validate(cls, d: dict, vocab: int | None) -> Chunk:
        stats = d.get("stats")
        if stats is not None and not isinstance(stats, dict):
            raise ProtocolError("stats: expected a map")
        return cls(
            request_id=f.ident(d.get("request_id"), "request_id"),
            seq=f.integer(d.get("seq"), "seq", 0, 1 << 40),
            offset=f.integer(d.get("offset"), "offset", 0, 1 << 40),
            token_ids=f.token_ids(d.get("token_ids", []), "token_ids", vocab, f.MAX_CHUNK_TOKENS),
            text=f.string(d.get("text", ""), "text", f.MAX_TEXT_CHARS),
            finished=f.boolean(d.get("finished", False), "finished"),
            finish_reason=f.optional(d.get("finish_reason"), f.string, "finish_reason", 32),
            error=f.optional(d.get("error"), f.string, "error", 10_000),
            error_type=f.optional(d.get("error_type"), f.string, "error_type", 64),
            stats=stats,
            verifier=f.string(d.get("verifier", ""), "verifier", f.MAX_NAME_CHARS),
        )


@dataclass
class Cancel(Message):
    """Client -> ``cancel``: stop a request."""

    TYPE: ClassVar[str] = "cancel"
    request_id: str
    owner: str | None = None  # the request's owner secret (an owned request ignores a cancel without it)

    @classmethod
    def validate(cls, d: dict, vocab: int | None) -> Cancel:
        return cls(request_id=f.ident(d.get("request_id"), "request_id"),
                   owner=f.optional(d.get("owner"), f.string, "owner", f.MAX_NAME_CHARS, allow_empty=False))


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (GenerationRequest, DraftJob, DraftClose, Draft, VoteAsk, Vote, Chunk, Cancel)
}


def encode(msg: Message) -> bytes:
    body = msg.to_dict()
    body["v"] = SCHEMA_VERSION
    body["t"] = msg.TYPE
    return msgpack.packb(body, use_bin_type=True)


def entry(msg: Message) -> dict[bytes, bytes]:
    """The stream entry's field map for ``msg``."""
    return {FIELD: encode(msg)}


def decode(raw: bytes, expected: tuple[type[Message], ...] | None = None, vocab: int | None = None) -> Message:
    """Decode and validate one message; raises :class:`ProtocolError` with the reason."""
    if not isinstance(raw, (bytes, bytearray)):
        raise ProtocolError(f"payload: expected bytes, got {type(raw).__name__}")
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises several types for garbage
        raise ProtocolError(f"not msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(body, dict):
        raise ProtocolError(f"payload: expected a map, got {type(body).__name__}")
    version = body.get("v")
    if version != SCHEMA_VERSION:
        raise ProtocolError(f"schema version {version!r} is not {SCHEMA_VERSION}")
    mtype = body.get("t")
    cls = MESSAGE_TYPES.get(mtype) if isinstance(mtype, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {mtype!r}"[:200])
    if expected is not None and cls not in expected:
        raise ProtocolError(f"message type {cls.TYPE!r} does not belong on this stream")
    known = {f.name for f in fields(cls)} | {"v", "t"}
    extra = set(body) - known
    if extra:
        raise ProtocolError(f"unknown fields {sorted(map(str, extra))}")
    return cls.validate(body, vocab)


def check(msg: Message) -> Message:
    """``msg`` as its reader will see it (encoded, decoded and validated): a sender learns at once what a
    receiver would refuse. Raises :class:`ProtocolError` with the reason."""
    try:
        raw = encode(msg)
    except (TypeError, ValueError, OverflowError) as exc:  # e.g. an integer no wire format holds
        raise ProtocolError(f"message: cannot be encoded: {type(exc).__name__}: {exc}") from exc
    return decode(raw, (type(msg),))


def peek_request_id(fields_map: dict) -> tuple[str, str | None] | None:
    """Best effort: the request id and owner secret inside an entry that failed validation (to tell its client
    why, on its own output stream)."""
    try:
        body = msgpack.unpackb(fields_map[FIELD], raw=False)
        owner = body.get("owner")
        return check_name("request_id", body["request_id"]), owner if isinstance(owner, str) and owner else None
    except Exception:
        return None


def decode_entry(fields_map: dict, expected: tuple[type[Message], ...] | None = None,
                 vocab: int | None = None) -> Message:
    """Decode a stream entry's field map (``{b"d": payload}``)."""
    if not isinstance(fields_map, dict) or set(fields_map) != {FIELD}:
        keys = sorted(str(k) for k in fields_map) if isinstance(fields_map, dict) else type(fields_map).__name__
        raise ProtocolError(f"entry: expected exactly one field 'd', got {keys}")
    return decode(fields_map[FIELD], expected, vocab)
