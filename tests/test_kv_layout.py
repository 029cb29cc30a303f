"""The runner keeps every row's committed slots contiguous, so most passes need no attention mask.

Rejected draft slots are never holes: a chain's rejected tail is cut off by its length, a tree's accepted
path is moved down to follow the committed slots. A pass whose rows start at the same length and feed
chains hands transformers no mask (it picks SDPA's causal path or builds a plain causal block); only
rows of different lengths or trees get one, built once per pass.
"""

from __future__ import annotations

import random

import torch

from cosine.engine.acceptance import accept
from cosine.engine.runner import ModelRunner, Segment
from cosine.engine.sequence import Sequence
from cosine.engine.target import TargetVerifier
from cosine.engine.tree import DraftTree
from cosine.sampling_params import SamplingParams

from .helpers import tiny_llama
from .test_kv_cache import assert_row_matches


class MaskSpy:
    """Records the attention mask each forward of ``runner`` gave its model (lean or transformers' forward)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.masks: list[torch.Tensor | None] = []
        inner = ModelRunner.call_model

        def spy(this, ids, pos, mask, keep):  # on the class: prefills run in a copy of the runner
            if this.model is runner.model:
                self.masks.append(mask)
            return inner(this, ids, pos, mask, keep)

        ModelRunner.call_model = spy
        self._inner = inner

    def close(self) -> None:
        ModelRunner.call_model = self._inner


def _greedy_next(model, tokens: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([tokens]), max_new_tokens=n, do_sample=False)
    return out[0, len(tokens):].tolist()


def test_tree_rollback_leaves_the_row_contiguous():
    """An accepted path through an alternative (not a prefix of the segment) is moved down: the row's
    slots stay [0, length), the cache ends at the longest row, and its KV equals a recompute."""
    model = tiny_llama(vocab=53, seed=11)
    verifier = TargetVerifier(ModelRunner(model), eos_id=None)
    seq = Sequence([3, 9, 4, 17, 8], SamplingParams(max_new_tokens=40))
    verifier.admit([seq])
    truth = _greedy_next(model, seq.tokens, 2)
    tree = DraftTree()
    wrong = (truth[0] + 1) % 53
    first = tree.add(wrong, -1)  # the spine is rejected ...
    tree.add((truth[1] + 1) % 53, first)
    alt = tree.add(truth[0], -1)  # ... and its sibling, node 2, accepted: slots 0 and 3 of the segment stay
    tree.add(truth[1], alt)
    [res] = verifier.step({seq.seq_id: tree})
    assert res.accepted == 2 and res.new_tokens[:2] == truth
    runner = verifier.runner
    assert runner.lengths() == [len(seq) - 1]
    assert runner.kv.physical == len(seq) - 1
    assert runner.kv.slots_of(0).tolist() == list(range(len(seq) - 1))
    assert_row_matches(runner, seq.seq_id, seq.tokens[:-1])


def test_chain_and_single_token_passes_at_batch_one_build_no_mask():
    model = tiny_llama(vocab=53, seed=12)
    runner = ModelRunner(model)
    runner.add_rows(["a"], [[5, 6, 7, 8]])
    spy = MaskSpy(runner)
    try:
        for seg in (Segment.chain([1]), Segment.chain([2, 3, 4]), Segment([9, 10, 11], [-1, -1, 0])):
            runner.forward([seg])
            runner.commit([[True] + [False] * (len(seg) - 1)])
    finally:
        spy.close()
    one, chain, tree = spy.masks
    assert one is None and chain is None, "a plain step or a chain at batch 1 needs no mask of ours"
    assert tree is not None and tree.dtype == torch.bool and tree.shape == (1, 1, 3, 6 + 3)
    assert tree[0, 0, 2].tolist() == [True] * 6 + [True, False, True]  # node 2 sees the prefix, node 0, itself


def test_prefill_of_different_lengths_needs_no_mask_and_equal_rows_share_the_causal_path():
    model = tiny_llama(vocab=53, seed=13)
    runner = ModelRunner(model)
    spy = MaskSpy(runner)
    try:
        runner.add_rows(["a", "b"], [[1, 2, 3, 4, 5], [6, 7, 8, 9]])  # one group, right-padded: causal
        runner.forward([Segment.chain([10]), Segment.chain([11, 12])])  # lengths 5 and 4: a mask
        runner.commit([[True, False], [True, True]])  # both rows now hold 6 tokens
        runner.forward([Segment.chain([13, 14]), Segment.chain([15, 16])])
        runner.commit([[True, True], [True, True]])
    finally:
        spy.close()
    prefill, uneven, even = spy.masks
    assert prefill is None and even is None and uneven is not None
    for sid, toks in (("a", [1, 2, 3, 4, 5, 10, 13, 14]), ("b", [6, 7, 8, 9, 11, 12, 15, 16])):
        assert_row_matches(runner, sid, toks)


def test_a_batched_pass_over_stale_slots_equals_each_row_alone():
    """Rows of different lengths, each with rejected slots left past its length: the batched pass's logits
    are each row's logits at batch 1 (the mask hides every stale slot)."""
    model = tiny_llama(vocab=53, seed=14)
    rng = random.Random(15)
    prompts = {sid: [rng.randrange(53) for _ in range(n)] for sid, n in (("a", 3), ("b", 9), ("c", 6))}
    batched = ModelRunner(model)
    batched.add_rows(list(prompts), list(prompts.values()))
    alone = {sid: ModelRunner(model) for sid in prompts}
    for sid, runner in alone.items():
        runner.add_rows([sid], [prompts[sid]])
    for _ in range(5):
        segs = {sid: Segment([rng.randrange(53) for _ in range(4)], [-1, 0, -1, 2]) for sid in prompts}
        # keep node 2 (the second root) and sometimes its child: nodes 0 and 1 are left as stale slots
        keep = {sid: [False, False, True, rng.random() < 0.5] for sid in prompts}
        got = batched.forward([segs[sid] for sid in batched.row_ids])
        for row, sid in enumerate(batched.row_ids):
            ref = alone[sid].forward([segs[sid]])
            torch.testing.assert_close(got[row], ref[0], atol=2e-5, rtol=1e-4)
            alone[sid].commit([keep[sid]])
        batched.commit([keep[sid] for sid in batched.row_ids])
        for sid in prompts:
            assert batched.length_of(sid) == alone[sid].length_of(sid)
    assert batched.kv.physical == max(batched.lengths())


def test_one_argmax_for_the_batch_gives_the_same_greedy_acceptance():
    rng = random.Random(16)
    for _ in range(20):
        tree = DraftTree()
        for i in range(rng.randint(0, 6)):
            tree.add(rng.randrange(5), rng.randrange(-1, i))
        logits = torch.randn(len(tree) + 1, 5)
        best = logits.argmax(dim=-1).tolist()
        a = accept(logits, tree, SamplingParams(), 0, 0)
        b = accept(logits, tree, SamplingParams(), 0, 0, best=best)
        assert (a.path, a.tokens) == (b.path, b.tokens)
