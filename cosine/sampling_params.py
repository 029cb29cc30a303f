"""Per-request generation parameters: one frozen object from the client to the drafter, validated when it is
built (by the client from the caller's arguments, by the protocol from a message)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cosine.errors import InvalidParameterError


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    ``temperature == 0`` is greedy decoding. ``top_k == 0`` and ``top_p == 1`` switch those filters off.
    ``seed`` makes sampling reproducible; without one the engine draws a seed per request.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Accept a single string and lists from callers while keeping the dataclass hashable.
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else _items("stop", self.stop))
        object.__setattr__(self, "stop_token_ids", _items("stop_token_ids", self.stop_token_ids))
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise :class:`InvalidParameterError` naming the first field out of range."""
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise InvalidParameterError("max_new_tokens", f"must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens <= 0:
            raise InvalidParameterError("max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature):
            raise InvalidParameterError("temperature", f"must be a finite number, got {self.temperature!r}")
        if self.temperature < 0:
            raise InvalidParameterError("temperature", f"must be >= 0, got {self.temperature}")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise InvalidParameterError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidParameterError("top_k", f"must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidParameterError("seed", f"must be an integer or None, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidParameterError("stop", "must be non-empty strings")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise InvalidParameterError("stop_token_ids", "must be non-negative integers")


def _items(name: str, value) -> tuple:
    """``value`` (a list, tuple or None) as a tuple; anything else is refused naming the field."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise InvalidParameterError(name, f"must be a list, got {type(value).__name__}")
    return tuple(value)
