"""The wire protocol: msgpack messages with a schema version and a type, validated on read.

Every stream entry has one field, ``d``, holding a msgpack map ``{"v": version, "t": type, ...fields}``.
:func:`decode` checks the version, the type, every field's type and bounds, token ids against the
vocabulary and lengths against caps, and raises :class:`ProtocolError` with a reason; the caller moves
such an entry to the dead-letter stream and carries on. No pickle anywhere.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import msgpack

from cosine.errors import CosineError, InvalidParameterError
from cosine.keys import check_name
from cosine.sampling_params import SamplingParams

SCHEMA_VERSION = 2  # 2: sampling parameters nested as ``params`` in requests and draft jobs
FIELD = b"d"

# Caps on what a message may carry.
MAX_PROMPT_TOKENS = 32_768
MAX_PROMPT_CHARS = 200_000
MAX_NEW_TOKENS = 32_768
MAX_DRAFT_NODES = 256
MAX_CHUNK_TOKENS = 4_096
MAX_TEXT_CHARS = 1_000_000
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_NAME_CHARS = 128
MAX_Q_TOP = 256  # probabilities per drafted token in sampled drafts
MAX_EXPERTS = 16  # drafter models named in one request or draft job
MAX_SPEC_K = 64  # draft positions per round
SPECULATION_MODES = ("adaptive", "off", "fixed")


class ProtocolError(CosineError):
    """A message that cannot be used: malformed, unknown, out of bounds. ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


# -- field checks ---------------------------------------------------------------------------------------
def _int(v: Any, name: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError(f"{name}: expected an integer, got {type(v).__name__}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ProtocolError(f"{name}: {v} outside [{lo}, {hi}]")
    return v


def _float(v: Any, name: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ProtocolError(f"{name}: expected a finite number, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ProtocolError(f"{name}: {v} outside [{lo}, {hi}]")
    return float(v)


def _str(v: Any, name: str, max_len: int, allow_empty: bool = True) -> str:
    if not isinstance(v, str):
        raise ProtocolError(f"{name}: expected a string, got {type(v).__name__}")
    if len(v) > max_len or (not allow_empty and not v):
        raise ProtocolError(f"{name}: length {len(v)} outside [{0 if allow_empty else 1}, {max_len}]")
    return v


def _ident(v: Any, name: str) -> str:
    _str(v, name, MAX_NAME_CHARS, allow_empty=False)
    try:
        return check_name(name, v)
    except InvalidParameterError as exc:
        raise ProtocolError(str(exc)) from exc


def _bool(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise ProtocolError(f"{name}: expected a boolean, got {type(v).__name__}")
    return v


def _tokens(v: Any, name: str, vocab: int | None, max_len: int, allow_empty: bool = True) -> list[int]:
    if not isinstance(v, list):
        raise ProtocolError(f"{name}: expected a list of token ids, got {type(v).__name__}")
    if len(v) > max_len or (not allow_empty and not v):
        raise ProtocolError(f"{name}: {len(v)} tokens outside [{0 if allow_empty else 1}, {max_len}]")
    hi = vocab - 1 if vocab is not None else 2**31 - 1
    for t in v:
        if isinstance(t, bool) or not isinstance(t, int) or not (0 <= t <= hi):
            raise ProtocolError(f"{name}: token id {t!r} outside the vocabulary [0, {hi}]")
    return v


def _names(v: Any, name: str) -> list[str]:
    if not isinstance(v, list) or len(v) > MAX_EXPERTS:
        raise ProtocolError(f"{name}: expected a list of at most {MAX_EXPERTS} names")
    return [_ident(n, name) for n in v]


def _weights(v: Any) -> list[float]:
    if not isinstance(v, list) or len(v) > MAX_EXPERTS:
        raise ProtocolError(f"expert_weights: expected a list of at most {MAX_EXPERTS} numbers")
    return [_float(w, "expert_weights", 1e-6, 1.0) for w in v]


def _votes(v: Any, vocab: int | None) -> dict[str, list[int]]:
    if not isinstance(v, dict) or len(v) > MAX_EXPERTS:
        raise ProtocolError(f"votes: expected a map of at most {MAX_EXPERTS} experts")
    return {_ident(k, "votes"): _tokens(t, "votes", vocab, MAX_SPEC_K) for k, t in v.items()}


def _vote_conf(v: Any) -> dict[str, list[float]]:
    if not isinstance(v, dict) or len(v) > MAX_EXPERTS:
        raise ProtocolError(f"vote_conf: expected a map of at most {MAX_EXPERTS} experts")
    out = {}
    for k, c in v.items():
        if not isinstance(c, list) or len(c) > MAX_SPEC_K:
            raise ProtocolError(f"vote_conf: expected at most {MAX_SPEC_K} confidences per expert")
        out[_ident(k, "vote_conf")] = [_float(x, "vote_conf", 0.0, 1.0) for x in c]
    return out


def _peers(v: Any) -> dict[str, str]:
    if not isinstance(v, dict) or len(v) > MAX_EXPERTS:
        raise ProtocolError(f"peers: expected a map of at most {MAX_EXPERTS} experts to workers")
    return {_ident(k, "peers"): _ident(w, "peers") for k, w in v.items()}


def _candidates(tokens: Any, probs: Any, vocab: int | None) -> tuple[list[int], list[float]]:
    tokens = _tokens(tokens, "tokens", vocab, 16)
    if not isinstance(probs, list) or len(probs) != len(tokens):
        raise ProtocolError("probs: one probability per token required")
    return tokens, [_float(p, "probs", 0.0, 1.0) for p in probs]


def _opt(v: Any, check, *args, **kwargs):
    return None if v is None else check(v, *args, **kwargs)


_PARAM_FIELDS = {f.name for f in fields(SamplingParams)}


def _params(v: Any, vocab: int | None) -> SamplingParams:
    """A request's sampling parameters: the wire's types and caps here, their meaning in SamplingParams."""
    if not isinstance(v, dict):
        raise ProtocolError(f"params: expected a map, got {type(v).__name__}")
    extra = set(v) - _PARAM_FIELDS
    if extra:
        raise ProtocolError(f"params: unknown fields {sorted(map(str, extra))}")
    stop = v.get("stop", [])
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS:
        raise ProtocolError(f"stop: expected at most {MAX_STOP_STRINGS} strings")
    try:
        return SamplingParams(
            max_new_tokens=_int(v.get("max_new_tokens", 64), "max_new_tokens", 1, MAX_NEW_TOKENS),
            temperature=_float(v.get("temperature", 0.0), "temperature", 0.0, 100.0),
            top_p=_float(v.get("top_p", 1.0), "top_p", 0.0, 1.0),
            top_k=_int(v.get("top_k", 0), "top_k", 0, 1 << 20),
            seed=_opt(v.get("seed"), _int, "seed", 0, 2**63 - 1),
            stop=[_str(s, "stop", MAX_STOP_CHARS, allow_empty=False) for s in stop],
            stop_token_ids=_tokens(v.get("stop_token_ids", []), "stop_token_ids", vocab, 64),
            ignore_eos=_bool(v.get("ignore_eos", False), "ignore_eos"),
        )
    except InvalidParameterError as exc:
        raise ProtocolError(str(exc)) from exc


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
    params: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0
    deadline_ms: int | None = None  # absolute, ms since the epoch
    drafter: str | None = None  # pin a drafter model by name
    drafters: list[str] = field(default_factory=list)  # restrict routing to these drafter models
    speculation: str = "adaptive"  # "adaptive" (the controller's choice), "off" (plain decoding) or "fixed"
    spec_k: int | None = None  # draft positions per round when speculation is "fixed"
    created_ms: int = 0

    @classmethod
    def validate(cls, d: dict, vocab: int | None) -> GenerationRequest:
        prompt = _opt(d.get("prompt"), _str, "prompt", MAX_PROMPT_CHARS)
        prompt_ids = _opt(d.get("prompt_ids"), _tokens, "prompt_ids", vocab, MAX_PROMPT_TOKENS)
        if (prompt is None) == (prompt_ids is None):
            raise ProtocolError("exactly one of prompt and prompt_ids is required")
        if (prompt is not None and not prompt) or (prompt_ids is not None and not prompt_ids):
            raise ProtocolError("prompt: must not be empty")
        msg = cls(
            request_id=_ident(d.get("request_id"), "request_id"),
            prompt=prompt,
            prompt_ids=prompt_ids,
            params=_params(d.get("params", {}), vocab),
            priority=_int(d.get("priority", 0), "priority", -1000, 1000),
            deadline_ms=_opt(d.get("deadline_ms"), _int, "deadline_ms", 0, 2**53),
            drafter=_opt(d.get("drafter"), _ident, "drafter"),
            drafters=_names(d.get("drafters", []), "drafters"),
            speculation=_str(d.get("speculation", "adaptive"), "speculation", 16),
            spec_k=_opt(d.get("spec_k"), _int, "spec_k", 1, MAX_SPEC_K),
            created_ms=_int(d.get("created_ms", 0), "created_ms", 0, 2**53),
        )
        if msg.speculation not in SPECULATION_MODES:
            raise ProtocolError(f"speculation: {msg.speculation!r} is not one of {', '.join(SPECULATION_MODES)}")
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
            request_id=_ident(d.get("request_id"), "request_id"),
            verifier=_ident(d.get("verifier"), "verifier"),
            epoch=_int(d.get("epoch"), "epoch", 1, MAX_PROMPT_TOKENS + MAX_NEW_TOKENS),
            base=_int(d.get("base"), "base", 0, MAX_PROMPT_TOKENS + MAX_NEW_TOKENS),
            tokens=_tokens(d.get("tokens"), "tokens", vocab, MAX_PROMPT_TOKENS + MAX_NEW_TOKENS, allow_empty=False),
            k=_int(d.get("k"), "k", 1, MAX_SPEC_K),
            width=_int(d.get("width", 1), "width", 1, 16),
            experts=_names(d.get("experts", []), "experts"),
            expert_weights=_weights(d.get("expert_weights", [])),
            peers=_peers(d.get("peers", {})),
            sent_ms=_int(d.get("sent_ms", 0), "sent_ms", 0, 2**53),
            params=_opt(d.get("params"), _params, vocab),
            position=_int(d.get("position", 0), "position", 0, MAX_NEW_TOKENS),
            q_top=_int(d.get("q_top", 0), "q_top", 0, MAX_Q_TOP),
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
        return cls(request_id=_ident(d.get("request_id"), "request_id"))


@dataclass
class Draft(Message):
    """Drafter -> ``verify:{verifier}``: a draft tree built on ``epoch`` committed tokens.

    ``resync`` asks the verifier to resend the whole sequence (the drafter lost its state)."""

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

    @classmethod
    def validate(cls, d: dict, vocab: int | None) -> Draft:
        tokens = _tokens(d.get("tokens", []), "tokens", vocab, MAX_DRAFT_NODES)
        parents = d.get("parents", [])
        if not isinstance(parents, list) or len(parents) != len(tokens):
            raise ProtocolError("parents: one parent per token required")
        for i, p in enumerate(parents):
            _int(p, "parents", -1, i - 1)
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
            _tokens(ids, "q_ids", vocab, MAX_Q_TOP, allow_empty=False)
            if not isinstance(probs, list) or len(probs) != len(ids):
                raise ProtocolError("q_probs: one probability per id required")
            for p in probs:
                _float(p, "q_probs", 0.0, 1.0)
            if tokens[i] not in ids or probs[ids.index(tokens[i])] <= 0:
                raise ProtocolError("q_ids: a sampled token must have a positive probability")
        return cls(
            request_id=_ident(d.get("request_id"), "request_id"),
            drafter=_ident(d.get("drafter"), "drafter"),
            epoch=_int(d.get("epoch"), "epoch", 1, MAX_PROMPT_TOKENS + MAX_NEW_TOKENS),
            tokens=tokens,
            parents=parents,
            confidences=[_float(c, "confidences", 0.0, 1.0) for c in confidences],
            sources=[_ident(s, "sources") for s in sources],
            resync=_bool(d.get("resync", False), "resync"),
            job_sent_ms=_int(d.get("job_sent_ms", 0), "job_sent_ms", 0, 2**53),
            draft_ms=_float(d.get("draft_ms", 0.0), "draft_ms", 0.0, 1e9),
            q_ids=q_ids,
            q_probs=q_probs,
            votes=_votes(d.get("votes", {}), vocab),
            vote_conf=_vote_conf(d.get("vote_conf", {})),
            feature=_str(d.get("feature", ""), "feature", MAX_NAME_CHARS),
            lookahead=_bool(d.get("lookahead", False), "lookahead"),
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
            request_id=_ident(d.get("request_id"), "request_id"),
            lead=_ident(d.get("lead"), "lead"),
            ticket=_int(d.get("ticket"), "ticket", 0, 2**62),
            expert=_ident(d.get("expert"), "expert"),
            base=_int(d.get("base"), "base", 0, MAX_PROMPT_TOKENS + MAX_NEW_TOKENS),
            tokens=_tokens(d.get("tokens"), "tokens", vocab, MAX_PROMPT_TOKENS + MAX_NEW_TOKENS, allow_empty=False),
            width=_int(d.get("width", 1), "width", 1, 16),
            check=_int(d.get("check", 0), "check", 0, 2**32 - 1),
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
        tokens, probs = _candidates(d.get("tokens", []), d.get("probs", []), vocab)
        return cls(
            request_id=_ident(d.get("request_id"), "request_id"),
            worker=_ident(d.get("worker"), "worker"),
            ticket=_int(d.get("ticket"), "ticket", 0, 2**62),
            expert=_ident(d.get("expert"), "expert"),
            tokens=tokens,
            probs=probs,
            resync=_bool(d.get("resync", False), "resync"),
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
            request_id=_ident(d.get("request_id"), "request_id"),
            seq=_int(d.get("seq"), "seq", 0, 1 << 40),
            offset=_int(d.get("offset"), "offset", 0, 1 << 40),
            token_ids=_tokens(d.get("token_ids", []), "token_ids", vocab, MAX_CHUNK_TOKENS),
            text=_str(d.get("text", ""), "text", MAX_TEXT_CHARS),
            finished=_bool(d.get("finished", False), "finished"),
            finish_reason=_opt(d.get("finish_reason"), _str, "finish_reason", 32),
            error=_opt(d.get("error"), _str, "error", 10_000),
            error_type=_opt(d.get("error_type"), _str, "error_type", 64),
            stats=stats,
            verifier=_str(d.get("verifier", ""), "verifier", MAX_NAME_CHARS),
        )


@dataclass
class Cancel(Message):
    """Client -> ``cancel``: stop a request."""

    TYPE: ClassVar[str] = "cancel"
    request_id: str

    @classmethod
    def validate(cls, d: dict, vocab: int | None) -> Cancel:
        return cls(request_id=_ident(d.get("request_id"), "request_id"))


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
    cls = MESSAGE_TYPES.get(body.get("t"))  # type: ignore[arg-type]
    if cls is None:
        raise ProtocolError(f"unknown message type {body.get('t')!r}")
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
    return decode(encode(msg), (type(msg),))


def peek_request_id(fields_map: dict) -> str | None:
    """Best effort: the request id inside an entry that failed validation (to tell its client why)."""
    try:
        body = msgpack.unpackb(fields_map[FIELD], raw=False)
        return check_name("request_id", body["request_id"])
    except Exception:
        return None


def decode_entry(fields_map: dict, expected: tuple[type[Message], ...] | None = None, vocab: int | None = None) -> Message:
    """Decode a stream entry's field map (``{b"d": payload}``)."""
    if not isinstance(fields_map, dict) or set(fields_map) != {FIELD}:
        keys = sorted(str(k) for k in fields_map) if isinstance(fields_map, dict) else type(fields_map).__name__
        raise ProtocolError(f"entry: expected exactly one field 'd', got {keys}")
    return decode(fields_map[FIELD], expected, vocab)
