"""The request as the engine sees it: one object flows through admission, drafting, verification, finish."""

from __future__ import annotations

import itertools
from collections.abc import Collection
from dataclasses import dataclass, field
from enum import Enum

from cosine.engine.sampling import fresh_seed
from cosine.errors import InvalidParameterError
from cosine.sampling_params import SamplingParams

_ids = itertools.count()


class FinishReason(str, Enum):
    STOP = "stop"  # end-of-sequence token, a stop token or a stop string
    LENGTH = "length"  # max_new_tokens or the model's context
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    ERROR = "error"


@dataclass
class SpecStats:
    """Speculation counters with vLLM's definitions.

    ``drafts``: verification rounds that had a draft; ``drafted``: draft positions proposed (tree depth);
    ``accepted``: draft tokens accepted; ``plain_steps``: rounds without a draft.
    """

    drafts: int = 0
    drafted: int = 0
    accepted: int = 0
    tree_nodes: int = 0
    plain_steps: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)
    tokens_by_drafter: dict[str, int] = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """1 + accepted / drafts: tokens committed per drafted round, counting the bonus token."""
        return 1.0 + self.accepted / self.drafts if self.drafts else 1.0

    def record(self, depth: int, nodes: int, accepted: int, sources: list[str]) -> None:
        if depth == 0:
            self.plain_steps += 1
            return
        self.drafts += 1
        self.drafted += depth
        self.tree_nodes += nodes
        self.accepted += accepted
        for lst in (self.accepted_per_position, self.drafted_per_position):
            while len(lst) < depth:
                lst.append(0)
        for i in range(depth):
            self.drafted_per_position[i] += 1
        for i in range(accepted):
            self.accepted_per_position[i] += 1
        for s in sources:
            self.tokens_by_drafter[s] = self.tokens_by_drafter.get(s, 0) + 1

    def merge(self, other: SpecStats) -> None:
        self.drafts += other.drafts
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.tree_nodes += other.tree_nodes
        self.plain_steps += other.plain_steps
        for mine, theirs in (
            (self.accepted_per_position, other.accepted_per_position),
            (self.drafted_per_position, other.drafted_per_position),
        ):
            while len(mine) < len(theirs):
                mine.append(0)
            for i, v in enumerate(theirs):
                mine[i] += v
        for k, v in other.tokens_by_drafter.items():
            self.tokens_by_drafter[k] = self.tokens_by_drafter.get(k, 0) + v

    def as_dict(self) -> dict:
        return {
            "drafts": self.drafts,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "tree_nodes": self.tree_nodes,
            "plain_steps": self.plain_steps,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_acceptance_length": round(self.mean_acceptance_length, 4),
            "accepted_per_position": list(self.accepted_per_position),
            "drafted_per_position": list(self.drafted_per_position),
            "tokens_by_drafter": dict(self.tokens_by_drafter),
        }


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    seq_id: str = field(default_factory=lambda: f"seq-{next(_ids)}")
    drafter: str | None = None
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stats: SpecStats = field(default_factory=SpecStats)
    seed: int = -1

    def __post_init__(self) -> None:
        if self.seed < 0:
            self.seed = self.params.seed if self.params.seed is not None else fresh_seed()

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.output_ids)

    def append(self, new_tokens: list[int], eos: int | Collection[int] | None, max_len: int) -> int:
        """Append tokens until a stop condition (``eos``: the id or ids that end generation); returns how
        many were appended."""
        ends = () if eos is None or self.params.ignore_eos else (eos,) if isinstance(eos, int) else eos
        added = 0
        for tok in new_tokens:
            self.output_ids.append(tok)
            added += 1
            if tok in ends or (
                tok in self.params.stop_token_ids
            ):
                self.finish_reason = FinishReason.STOP
            elif len(self.output_ids) >= self.params.max_new_tokens or len(self) >= max_len:
                self.finish_reason = FinishReason.LENGTH
            if self.finish_reason is not None:
                break
        return added


def validate_prompt(prompt_ids: list[int], vocab_size: int, max_len: int) -> None:
    """Raise :class:`InvalidParameterError` for an unusable prompt."""
    if not isinstance(prompt_ids, (list, tuple)) or len(prompt_ids) == 0:
        raise InvalidParameterError("prompt", "must contain at least one token")
    if len(prompt_ids) >= max_len:
        raise InvalidParameterError(
            "prompt", f"has {len(prompt_ids)} tokens; the model's context holds {max_len}, leaving no room to generate"
        )
    for t in prompt_ids:
        if isinstance(t, bool) or not isinstance(t, int) or not (0 <= t < vocab_size):
            raise InvalidParameterError("prompt_token_ids", f"token id {t!r} is outside the vocabulary [0, {vocab_size})")
