"""TargetVerifier: owns the target model's KV state for many sequences and advances them in batches.

One :meth:`step` is one target forward for every sequence given: each brings a draft tree (or none, a
plain decoding step), the forward scores all trees at once, the acceptance rule picks each sequence's
accepted path and bonus token, the accepted path is committed into the cache and the rest rolled back.
The target-only autoregressive path is the same step with no drafts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cosine.engine.acceptance import Acceptance, accept
from cosine.engine.runner import ModelRunner, Segment
from cosine.engine.sequence import Sequence, validate_prompt
from cosine.engine.tree import DraftTree

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    seq: Sequence
    new_tokens: list[int]
    accepted: int
    depth: int


class TargetVerifier:
    def __init__(self, runner: ModelRunner, eos_id: int | None) -> None:
        self.runner = runner
        self.eos_id = eos_id
        self.seqs: dict[str, Sequence] = {}

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
        for sid in self.runner.row_ids:
            if sid not in drafts:
                segments.append(None)
                trees.append(None)
                continue
            seq = self.seqs[sid]
            tree = drafts[sid] or DraftTree()
            if tree.depth > self.room(seq):
                tree = tree.truncated(self.room(seq))
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
