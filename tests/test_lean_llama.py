"""The lean Llama forward gives the very logits transformers' forward gives, over every shape of pass the
engine runs: prefills in groups, one-token steps, chains after the cache, trees with masks, rows of
different lengths, subsets of rows, last-position projections, rows dropped and added."""

from __future__ import annotations

import random

import pytest
import torch

from cosine.engine import lean_llama
from cosine.engine.runner import ModelRunner, Segment
from cosine.engine.target import TargetVerifier

from .helpers import tiny_llama


def _pair(model) -> tuple[ModelRunner, ModelRunner]:
    lean, plain = ModelRunner(model, "lean"), ModelRunner(model, "plain", lean=False)
    assert lean.lean and not plain.lean
    return lean, plain


def _same(a: torch.Tensor | None, b: torch.Tensor | None, rows: list[int] | None = None) -> None:
    if a is None or b is None:
        assert a is None and b is None
        return
    if rows is not None:
        a, b = a[rows], b[rows]
    assert torch.equal(a, b), f"max difference {(a - b).abs().max().item()}"


def _random_tree(rng: random.Random, vocab: int, n: int) -> Segment:
    parents = [-1] + [rng.randrange(-1, i) for i in range(1, n)]
    return Segment([rng.randrange(vocab) for _ in range(n)], parents)


@pytest.mark.parametrize("seed,kv_heads", [(0, 2), (1, 4)])
def test_lean_forward_is_bit_identical_to_transformers(seed, kv_heads):
    """Both runners, one model: the same operations in the same order, logits compared with ``torch.equal``
    (GQA and plain multi-head attention)."""
    model = tiny_llama(vocab=61, seed=seed, layers=3, hidden=64)
    if kv_heads != model.config.num_key_value_heads:
        model.config.num_key_value_heads = kv_heads
        model = type(model)(model.config).eval()
    rng = random.Random(seed)
    runners = _pair(model)
    ids = [f"r{i}" for i in range(4)]
    prompts = [[rng.randrange(61) for _ in range(n)] for n in (3, 17, 16, 40)]
    for r in runners:
        r.add_rows(ids, prompts)
    assert runners[0].row_ids == runners[1].row_ids
    for step in range(14):
        rows = len(runners[0].row_ids)
        kind = step % 5
        if kind == 0:  # one token per row
            segs = [Segment.chain([rng.randrange(61)]) for _ in range(rows)]
        elif kind == 1:  # chains of different lengths
            segs = [Segment.chain([rng.randrange(61) for _ in range(rng.randint(1, 5))]) for _ in range(rows)]
        elif kind == 2:  # trees
            segs = [_random_tree(rng, 61, rng.randint(1, 7)) for _ in range(rows)]
        elif kind == 3:  # a subset of the rows
            segs = [Segment.chain([rng.randrange(61), rng.randrange(61)]) if i == 1 else None for i in range(rows)]
        else:  # one row alone: a chain right after the cache
            segs = [None] * rows
            segs[0] = Segment.chain([rng.randrange(61) for _ in range(4)])
        fed = [i for i, s in enumerate(segs) if s is not None]
        for mode in ("all", "last"):
            outs = [r.forward(segs, logits=mode) for r in runners]
            _same(*outs, rows=fed)
            if mode == "all":
                keep = [[rng.random() < 0.6 for _ in range(len(s))] if s else [] for s in segs]
                q = max(len(s) for s in segs if s)
                keep = [k + [False] * (q - len(k)) for k in keep]
                for r in runners:
                    r.commit(keep)
            else:
                for r in runners:
                    r.commit([[False] * max(len(s) for s in segs if s)] * rows)
        assert runners[0].lengths() == runners[1].lengths()
        if step == 6:  # rows leave and join
            prompt = [rng.randrange(61) for _ in range(9)]
            for r in runners:
                r.remove_rows(["r1"])
                r.add_rows(["r4"], [prompt])
    for layer in range(3):
        for a, b in zip(runners[0].kv.layer_kv(layer), runners[1].kv.layer_kv(layer)):
            assert torch.equal(a, b)


def test_lean_verifier_matches_generate_on_the_zoo_target(zoo_engine):
    """Greedy steps through the lean target equal Hugging Face ``generate`` on the zoo target."""
    target = zoo_engine.verifier.runner.model
    assert zoo_engine.verifier.runner.lean
    prompt = list(range(5, 40))
    want = target.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    verifier = TargetVerifier(ModelRunner(target, "t"), eos_id=None)
    logits = verifier.runner
    logits.add_rows(["a"], [prompt[:-1]])
    got, last = [], prompt[-1]
    for _ in range(12):
        out = logits.forward([Segment.chain([last])], logits="last")
        logits.commit_segments([Segment.chain([last])])
        last = int(out[0].argmax())
        got.append(last)
    assert got == want


def test_models_it_does_not_reproduce_keep_transformers_forward():
    model = tiny_llama()
    model.config._attn_implementation = "eager"
    assert not lean_llama.supports(model)
    assert not ModelRunner(model).lean
    model.config._attn_implementation = "sdpa"
    model.train()
    assert not lean_llama.supports(model)
