"""The seam between a verifier and its target engine: everything the verifier service asks of the model.

:class:`~cosine.engine.target.TargetVerifier` (the engine of this package, over a Hugging Face model) is the
reference implementation and the simulation's ``SimTarget`` a second one; another serving engine can stand
behind a verifier by implementing :class:`TargetBackend`. The contract, which the verifier's exactness and
recovery rest on:

* ``admit`` prefills new sequences (all of one call, or none: it raises and holds none of them), ``release``
  forgets sequences (unknown ids are ignored); ``seqs`` maps the ids held to their sequences.
* ``step(drafts)`` runs one target pass over the sequences named (a draft tree each, or None for a plain
  step), accepts by the rule of :mod:`cosine.engine.acceptance` with each sequence's own seed, appends the
  accepted tokens and the bonus token to the sequence, and returns them; sequences not named do not move.
* ``validate`` raises :class:`~cosine.errors.InvalidParameterError` for a sequence it could never run,
  ``room`` is how many draft positions a sequence may still use, ``fits``/``fits_need``/``reservation``
  answer for a memory budget (always fitting without one), ``stats`` is what the heartbeat publishes
  about its work and memory.

``tests/test_backend_seam.py`` checks that the service layer touches nothing else of its engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from cosine.engine.sequence import Sequence
from cosine.engine.tree import DraftTree


@runtime_checkable
class TargetBackend(Protocol):
    @property
    def vocab_size(self) -> int:
        """Token ids the target scores: requests and drafts are checked against it."""

    @property
    def max_len(self) -> int:
        """The context: prompt and output together never exceed it."""

    @property
    def seqs(self) -> Mapping[str, Sequence]:
        """The sequences held, by id."""

    def validate(self, seq: Sequence) -> None: ...

    def admit(self, seqs: list[Sequence]) -> None: ...

    def release(self, seq_ids: list[str]) -> None: ...

    def room(self, seq: Sequence) -> int: ...

    def step(self, drafts: dict[str, DraftTree | None]) -> list: ...

    def reservation(self, seq: Sequence) -> int: ...

    def fits(self, seq: Sequence, beside=()): ...

    def fits_need(self, need: int, beside=(), exclude: str | None = None): ...

    def stats(self) -> dict: ...
