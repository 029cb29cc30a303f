"""Unit tests of draft trees, logits processing, keyed randomness and the greedy rule."""

from __future__ import annotations

import pytest
import torch

from cosine.engine.acceptance import accept
from cosine.engine.sampling import keyed_uniform, probabilities, sample_with
from cosine.engine.tree import DraftTree
from cosine.sampling_params import SamplingParams


def one_hot_logits(rows: list[int], vocab: int = 10) -> torch.Tensor:
    out = torch.zeros((len(rows), vocab))
    for i, t in enumerate(rows):
        out[i, t] = 5.0
    return out


def test_tree_structure():
    tree = DraftTree()
    a = tree.add(4, -1)
    tree.add(5, -1)
    c = tree.add(6, a)
    tree.add(7, c)
    assert tree.children(-1) == [0, 1] and tree.children(a) == [2] and tree.depth == 3
    cut = tree.truncated(2)
    assert cut.tokens == [4, 5, 6] and cut.parents == [-1, -1, 0] and cut.depth == 2
    with pytest.raises(ValueError):
        tree.add(1, 10)


def test_greedy_accepts_longest_matching_path_then_bonus():
    # Target argmax: root->4, after 4 ->6, after 6 ->9 (bonus).
    tree = DraftTree()
    n4 = tree.add(4, -1)
    tree.add(5, -1)
    n6 = tree.add(6, n4)
    tree.add(8, n6)
    logits = one_hot_logits([4, 6, 1, 9, 2])  # rows: root, node0(4), node1(5), node2(6), node3(8)
    acc = accept(logits, tree, SamplingParams(), seed=0, position=0)
    assert acc.path == [0, 2] and acc.tokens == [4, 6, 9]


def test_greedy_takes_an_alternative_sibling():
    tree = DraftTree()
    tree.add(4, -1)
    tree.add(5, -1)  # alternative: the target wants 5, then 3
    logits = one_hot_logits([5, 0, 3])
    acc = accept(logits, tree, SamplingParams(), 0, 0)
    assert acc.path == [1] and acc.tokens == [5, 3]


def test_greedy_rejects_everything():
    tree = DraftTree.chain([1, 2])
    acc = accept(one_hot_logits([7, 0, 0]), tree, SamplingParams(), 0, 0)
    assert acc.path == [] and acc.tokens == [7]


def test_keyed_uniform_is_deterministic_and_spread():
    us = [keyed_uniform(42, i, 0) for i in range(2000)]
    assert us == [keyed_uniform(42, i, 0) for i in range(2000)]
    assert keyed_uniform(42, 0, 0) != keyed_uniform(43, 0, 0) != keyed_uniform(42, 0, 1)
    assert all(0.0 <= u < 1.0 for u in us)
    assert abs(sum(us) / len(us) - 0.5) < 0.03


def test_probabilities_temperature_top_k_top_p():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    p = probabilities(logits, SamplingParams(temperature=1.0))
    torch.testing.assert_close(p, torch.softmax(logits, -1))
    p = probabilities(logits, SamplingParams(temperature=0.5))
    torch.testing.assert_close(p, torch.softmax(logits / 0.5, -1))
    p = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (p[2:] == 0).all() and abs(float(p.sum()) - 1) < 1e-6
    full = torch.softmax(logits, -1)
    p = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.7))
    # Smallest prefix reaching 0.7: the first token holds 0.56, the first two 0.77.
    kept = (p > 0).nonzero().flatten().tolist()
    assert kept == [0, 1]
    torch.testing.assert_close(p[:2], full[:2] / full[:2].sum())
    g = probabilities(logits, SamplingParams())
    assert g.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_sample_with_inverse_cdf():
    p = torch.tensor([0.2, 0.0, 0.5, 0.3])
    assert sample_with(p, 0.0) == 0
    assert sample_with(p, 0.19) == 0
    assert sample_with(p, 0.21) == 2
    assert sample_with(p, 0.71) == 3
    assert sample_with(p, 0.999999) == 3
    assert sample_with(torch.tensor([0.5, 0.5, 0.0]), 0.9999999999) == 1
