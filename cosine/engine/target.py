"""TargetVerifier: owns the target model's KV state for many sequences and advances them in batches.

One :meth:`step` is one target forward for every sequence given: each brings a draft tree (or none, a
plain decoding step), the forward scores all trees at once, the acceptance rule picks each sequence's
accepted path and bonus token, the accepted path is committed into the cache and the rest rolled back.
The target-only autoregressive path is the same step with no drafts.

With ``capacity_tokens`` (a KV budget in token slots, :mod:`cosine.engine.kv_budget`) every sequence
reserves its whole prompt + ``max_new_tokens`` (capped by the context) when admitted. The cache is a
rectangle, every row as long as the longest, so what the admitted sequences hold is rows x the longest
reservation: :meth:`fits` says whether one more fits now, and whether it could fit alone. A pass's draft
trees are cut where they would take the buffers past the budget (speculation only: the output is the same).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cosine.engine.acceptance import Acceptance, accept
from cosine.engine.kv_budget import bytes_per_token
from cosine.engine.runner import ModelRunner, Segment
from cosine.engine.sequence import Sequence, validate_prompt
from cosine.engine.tree import DraftTree

log = logging.getLogger(__name__)


@dataclass
class Fit:
    """Whether a sequence's KV reservation fits: ``now`` beside the sequences admitted (and ``beside``),
    ``ever`` in an empty cache. ``need``: its token slots; ``capacity``: the budget (None: unbounded)."""

    now: bool
    ever: bool
    need: int
    capacity: int | None


@dataclass
class StepResult:
    seq: Sequence
    new_tokens: list[int]
    accepted: int
    depth: int


class TargetVerifier:
    def __init__(self, runner: ModelRunner, eos_id: int | tuple[int, ...] | None,
                 capacity_tokens: int | None = None) -> None:
        """``capacity_tokens``: the KV token slots (rows x slots) the target's cache may take; None: no
        budget."""
        self.runner = runner
        self.eos_id = eos_id
        self.seqs: dict[str, Sequence] = {}
        self.capacity_tokens = capacity_tokens
        if getattr(runner, "kv", None) is not None:
            runner.kv.limit = capacity_tokens
        self.trees_cut = 0  # draft trees cut to stay within the budget

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    @property
    def max_len(self) -> int:
        return self.runner.max_positions

    def validate(self, seq: Sequence) -> None:
        validate_prompt(seq.prompt_ids, self.runner.vocab_size, self.max_len)

    def admit(self, seqs: list[Sequence]) -> None:
        """Prefill the target for new sequences (everything but their last token, which the next step feeds)."""
        for seq in seqs:
            self.validate(seq)
        self.runner.add_rows([s.seq_id for s in seqs], [s.tokens[:-1] for s in seqs])
        for seq in seqs:
            self.seqs[seq.seq_id] = seq

    # -- the KV budget --------------------------------------------------------------------------------
    def reservation(self, seq: Sequence) -> int:
        """Token slots a sequence may come to hold: its prompt and every token it may generate, at most the
        context."""
        return min(len(seq.prompt_ids) + seq.params.max_new_tokens, self.max_len)

    def fits(self, seq: Sequence, beside: tuple[Sequence, ...] | list[Sequence] = ()) -> Fit:
        """Whether ``seq`` fits the budget now, beside the admitted sequences and ``beside`` (sequences about
        to be admitted with it), each at its full reservation; and whether it could ever fit (alone)."""
        return self.fits_need(self.reservation(seq), [self.reservation(s) for s in beside], seq.seq_id)

    def fits_need(self, need: int, beside: list[int] | tuple[int, ...] = (), exclude: str | None = None) -> Fit:
        """:meth:`fits` for a reservation of ``need`` token slots (``beside``: those of sequences about to be
        admitted with it; ``exclude``: an admitted sequence not to count)."""
        cap = self.capacity_tokens
        if cap is None:
            return Fit(True, True, need, None)
        held = [self.reservation(s) for sid, s in self.seqs.items() if sid != exclude] + list(beside)
        return Fit((len(held) + 1) * max([need] + held) <= cap, need <= cap, need, cap)

    @property
    def slot_bytes(self) -> int | None:
        """Bytes one KV token slot takes (None where the runner has no model config to tell)."""
        config = getattr(getattr(self.runner, "model", None), "config", None)
        try:
            return bytes_per_token(config, self.runner.dtype) if config is not None else None
        except (ValueError, AttributeError):
            return None

    def memory(self) -> dict:
        """The target cache's bytes now and at most so far, and the budget in token slots."""
        kv = getattr(self.runner, "kv", None)
        return {"kv_bytes": kv.allocated_bytes if kv is not None else 0,
                "kv_peak_bytes": kv.peak_bytes if kv is not None else 0,
                "kv_capacity_tokens": self.capacity_tokens if self.capacity_tokens is not None else ""}

    def stats(self) -> dict:
        """What the heartbeat publishes about the target's work and memory: token slots its forwards computed,
        of them those holding a fed token (the rest is padding), and :meth:`memory`."""
        return {"slots_run": self.runner.slots_run, "slots_fed": self.runner.slots_fed, **self.memory()}

    def _tree_room(self) -> int | None:
        """Draft nodes a row may bring to the next pass within the budget (None: any). A pass writes every row
        up to the longest committed row plus the largest segment (root and nodes)."""
        kv = getattr(self.runner, "kv", None)
        if self.capacity_tokens is None or kv is None or not kv.rows:
            return None
        return max(0, self.capacity_tokens // kv.rows - kv.physical - 1)

    def release(self, seq_ids: list[str]) -> None:
        self.runner.remove_rows(seq_ids)
        for sid in seq_ids:
            self.seqs.pop(sid, None)

    def room(self, seq: Sequence) -> int:
        """How many draft positions the sequence can still use (output budget and context)."""
        return max(0, min(seq.remaining - 1, self.max_len - len(seq) - 1))

    def step(self, drafts: dict[str, DraftTree | None]) -> list[StepResult]:
        """One batched target forward over the sequences in ``drafts``; commits and returns their new tokens."""
        segments: list[Segment | None] = []
        trees: list[DraftTree | None] = []
        nodes = self._tree_room()
        for sid in self.runner.row_ids:
            if sid not in drafts:
                segments.append(None)
                trees.append(None)
                continue
            seq = self.seqs[sid]
            tree = drafts[sid] or DraftTree()
            if tree.depth > self.room(seq):
                tree = tree.truncated(self.room(seq))
            if nodes is not None and len(tree) > nodes:  # parents come first: the first nodes are a tree
                tree = tree.subset(list(range(nodes)))
                self.trees_cut += 1
            trees.append(tree)
            segments.append(Segment([seq.tokens[-1]] + tree.tokens, [-1] + [p + 1 for p in tree.parents]))
        logits = self.runner.forward(segments)
        assert logits is not None
        # Greedy rows need only the argmax: one op over the batch and one read-back for the pass.
        greedy = any(t is not None and self.seqs[sid].params.greedy for sid, t in zip(self.runner.row_ids, trees))
        best = logits.argmax(dim=-1).tolist() if greedy else None
        keep = [[False] * logits.shape[1] for _ in trees]
        results: list[StepResult] = []
        for row, (sid, tree) in enumerate(zip(self.runner.row_ids, trees)):
            if tree is None:
                continue
            seq = self.seqs[sid]
            acc: Acceptance = accept(logits[row], tree, seq.params, seq.seed, len(seq.output_ids),
                                     best[row] if best is not None and seq.params.greedy else None)
            keep[row][0] = True
            for node in acc.path:
                keep[row][node + 1] = True
            seq.stats.record(tree.depth, len(tree), acc.accepted, [tree.sources[i] for i in acc.path])
            added = seq.append(acc.tokens, self.eos_id, self.max_len)
            results.append(StepResult(seq, acc.tokens[:added], acc.accepted, tree.depth))
        self.runner.commit(keep)
        return results
