"""What a message's fields may hold: the caps on sizes and the checks every field goes through on read.

Each check returns the value when it is usable and raises :class:`ProtocolError` with a reason naming the
field otherwise; token ids are checked against the reader's vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from cosine.errors import CosineError, InvalidParameterError
from cosine.keys import check_name
from cosine.sampling_params import SamplingParams

# Caps on what a message may carry.
MAX_PROMPT_TOKENS = 32_768
MAX_PROMPT_CHARS = 200_000
MAX_NEW_TOKENS = 32_768
MAX_SEQUENCE = MAX_PROMPT_TOKENS + MAX_NEW_TOKENS  # committed tokens of one request
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
CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGES = 256  # chat messages in one request


class ProtocolError(CosineError):
    """A message that cannot be used: malformed, unknown, out of bounds. ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


# -- field checks ---------------------------------------------------------------------------------------
def integer(v: Any, name: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError(f"{name}: expected an integer, got {type(v).__name__}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ProtocolError(f"{name}: {v} outside [{lo}, {hi}]")
    return v


def number(v: Any, name: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ProtocolError(f"{name}: expected a finite number, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ProtocolError(f"{name}: {v} outside [{lo}, {hi}]")
    return float(v)


def string(v: Any, name: str, max_len: int, allow_empty: bool = True) -> str:
    if not isinstance(v, str):
        raise ProtocolError(f"{name}: expected a string, got {type(v).__name__}")
    if len(v) > max_len or (not allow_empty and not v):
        raise ProtocolError(f"{name}: length {len(v)} outside [{0 if allow_empty else 1}, {max_len}]")
    return v


def ident(v: Any, name: str) -> str:
    string(v, name, MAX_NAME_CHARS, allow_empty=False)
    try:
        return check_name(name, v)
    except InvalidParameterError as exc:
        raise ProtocolError(str(exc)) from exc


def boolean(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise ProtocolError(f"{name}: expected a boolean, got {type(v).__name__}")
    return v


def token_ids(v: Any, name: str, vocab: int | None, max_len: int, allow_empty: bool = True) -> list[int]:
    if not isinstance(v, list):
        raise ProtocolError(f"{name}: expected a list of token ids, got {type(v).__name__}")
    if len(v) > max_len or (not allow_empty and not v):
        raise ProtocolError(f"{name}: {len(v)} tokens outside [{0 if allow_empty else 1}, {max_len}]")
    hi = vocab - 1 if vocab is not None else 2**31 - 1
    for t in v:
        if isinstance(t, bool) or not isinstance(t, int) or not (0 <= t <= hi):
            raise ProtocolError(f"{name}: token id {t!r} outside the vocabulary [0, {hi}]")
    return v


def messages(v: Any) -> list[dict[str, str]]:
    """Chat messages: at most MAX_MESSAGES ``{"role", "content"}`` objects, MAX_PROMPT_CHARS of content."""
    if not isinstance(v, list) or not v or len(v) > MAX_MESSAGES:
        raise ProtocolError(f"messages: expected a list of 1 to {MAX_MESSAGES} messages")
    out, chars = [], 0
    for i, m in enumerate(v):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise ProtocolError(f"messages: message {i} must have exactly 'role' and 'content'")
        role = string(m["role"], "role", 16, allow_empty=False)
        if role not in CHAT_ROLES:
            raise ProtocolError(f"messages: message {i} has role {role!r}, not one of {', '.join(CHAT_ROLES)}")
        content = string(m["content"], "content", MAX_PROMPT_CHARS)
        chars += len(content)
        out.append({"role": role, "content": content})
    if chars > MAX_PROMPT_CHARS:
        raise ProtocolError(f"messages: {chars} characters of content, more than {MAX_PROMPT_CHARS}")
    return out


def names(v: Any, name: str) -> list[str]:
    if not isinstance(v, list) or len(v) > MAX_EXPERTS:
        raise ProtocolError(f"{name}: expected a list of at most {MAX_EXPERTS} names")
    return [ident(n, name) for n in v]


def weights(v: Any) -> list[float]:
    if not isinstance(v, list) or len(v) > MAX_EXPERTS:
        raise ProtocolError(f"expert_weights: expected a list of at most {MAX_EXPERTS} numbers")
    return [number(w, "expert_weights", 1e-6, 1.0) for w in v]


def votes(v: Any, vocab: int | None) -> dict[str, list[int]]:
    if not isinstance(v, dict) or len(v) > MAX_EXPERTS:
        raise ProtocolError(f"votes: expected a map of at most {MAX_EXPERTS} experts")
    return {ident(k, "votes"): token_ids(t, "votes", vocab, MAX_SPEC_K) for k, t in v.items()}


def vote_conf(v: Any) -> dict[str, list[float]]:
    if not isinstance(v, dict) or len(v) > MAX_EXPERTS:
        raise ProtocolError(f"vote_conf: expected a map of at most {MAX_EXPERTS} experts")
    out = {}
    for k, c in v.items():
        if not isinstance(c, list) or len(c) > MAX_SPEC_K:
            raise ProtocolError(f"vote_conf: expected at most {MAX_SPEC_K} confidences per expert")
        out[ident(k, "vote_conf")] = [number(x, "vote_conf", 0.0, 1.0) for x in c]
    return out


def peers(v: Any) -> dict[str, str]:
    if not isinstance(v, dict) or len(v) > MAX_EXPERTS:
        raise ProtocolError(f"peers: expected a map of at most {MAX_EXPERTS} experts to workers")
    return {ident(k, "peers"): ident(w, "peers") for k, w in v.items()}


def candidates(tokens: Any, probs: Any, vocab: int | None) -> tuple[list[int], list[float]]:
    tokens = token_ids(tokens, "tokens", vocab, 16)
    if not isinstance(probs, list) or len(probs) != len(tokens):
        raise ProtocolError("probs: one probability per token required")
    return tokens, [number(p, "probs", 0.0, 1.0) for p in probs]


def optional(v: Any, check, *args, **kwargs):
    return None if v is None else check(v, *args, **kwargs)


_PARAM_FIELDS = {f.name for f in fields(SamplingParams)}


def sampling(v: Any, vocab: int | None) -> SamplingParams:
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
            max_new_tokens=integer(v.get("max_new_tokens", 64), "max_new_tokens", 1, MAX_NEW_TOKENS),
            temperature=number(v.get("temperature", 0.0), "temperature", 0.0, 100.0),
            top_p=number(v.get("top_p", 1.0), "top_p", 0.0, 1.0),
            top_k=integer(v.get("top_k", 0), "top_k", 0, 1 << 20),
            seed=optional(v.get("seed"), integer, "seed", 0, 2**63 - 1),
            stop=[string(s, "stop", MAX_STOP_CHARS, allow_empty=False) for s in stop],
            stop_token_ids=token_ids(v.get("stop_token_ids", []), "stop_token_ids", vocab, 64),
            ignore_eos=boolean(v.get("ignore_eos", False), "ignore_eos"),
        )
    except InvalidParameterError as exc:
        raise ProtocolError(str(exc)) from exc
