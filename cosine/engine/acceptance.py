"""Lossless acceptance of a draft tree against the target's distributions.

``logits[0]`` is the target's output at the request's last committed token (the tree's root);
``logits[1 + i]`` its output at draft node ``i``. Three rules, all lossless:

* **Greedy** (temperature 0): follow the child whose token is the target's argmax; stop at the first
  node without one; the bonus token is the target's argmax there. Output = the target's greedy output.

* **One-hot / multi-candidate** (sampling, deterministic proposals, chains or trees): at a node with
  children ``c1, c2, ...`` in proposal order, try ``c1`` with probability ``p(c1)``; on rejection
  remove ``c1`` from ``p`` and renormalise, try ``c2``, and so on; when every child is rejected, sample
  the bonus from what is left of ``p``. We implement it by drawing one keyed sample ``y ~ p`` and
  accepting the child equal to ``y``: given ``y != c1``, ``y`` is distributed as ``p`` without ``c1``,
  renormalised, so trying siblings in turn and resampling from the residual is exactly this walk. The
  emitted tokens are the target's own keyed samples, hence identical to the target-only path.

* **Rejection sampling with drafter probabilities** (chains with ``q``): accept drafted ``x`` with
  probability ``min(1, p(x) / q(x))``; on rejection sample from ``max(0, p - q)`` renormalised; when
  every drafted token is accepted, sample the bonus from ``p``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cosine.engine.sampling import (
    ACCEPT,
    RESIDUAL,
    TARGET_SAMPLE,
    keyed_uniform,
    probabilities,
    sample_with,
)
from cosine.engine.tree import DraftTree
from cosine.sampling_params import SamplingParams


@dataclass
class Acceptance:
    path: list[int]  # accepted draft nodes, root to leaf
    tokens: list[int]  # tokens to commit: the accepted nodes' tokens, then the bonus token

    @property
    def accepted(self) -> int:
        return len(self.path)


def accept(
    logits: torch.Tensor,
    tree: DraftTree,
    params: SamplingParams,
    seed: int,
    position: int,
    best: list[int] | None = None,
) -> Acceptance:
    """Apply the rule that fits ``params`` and ``tree``; ``position`` is the output index of the first new token.
    ``best`` (greedy only): the argmax of each row of ``logits``, when the caller has it already (a batch's
    argmax in one op and one read-back instead of one per row)."""
    if params.greedy:
        return greedy_path(best if best is not None else logits[: len(tree) + 1].argmax(dim=-1).tolist(), tree)
    if tree.q is not None and len(tree) > 0:
        return _rejection(logits, tree, params, seed, position)
    return _one_hot(logits, tree, params, seed, position)


def greedy_path(best: list[int], tree: DraftTree) -> Acceptance:
    """The greedy rule given the target's argmax at the root (``best[0]``) and after each node."""
    node, path = -1, []
    while True:
        y = best[node + 1]
        nxt = next((c for c in tree.children(node) if tree.tokens[c] == y), None)
        if nxt is None:
            return Acceptance(path, [tree.tokens[i] for i in path] + [y])
        path.append(nxt)
        node = nxt


def _one_hot(logits: torch.Tensor, tree: DraftTree, params: SamplingParams, seed: int, position: int) -> Acceptance:
    node, path = -1, []
    while True:
        p = probabilities(logits[node + 1], params)
        y = sample_with(p, keyed_uniform(seed, position + len(path), TARGET_SAMPLE))
        nxt = next((c for c in tree.children(node) if tree.tokens[c] == y), None)
        if nxt is None:
            return Acceptance(path, [tree.tokens[i] for i in path] + [y])
        path.append(nxt)
        node = nxt


def _rejection(logits: torch.Tensor, tree: DraftTree, params: SamplingParams, seed: int, position: int) -> Acceptance:
    assert tree.q is not None
    node, path = -1, []
    while True:
        pos = position + len(path)
        p = probabilities(logits[node + 1], params)
        children = tree.children(node)
        if not children:
            y = sample_with(p, keyed_uniform(seed, pos, TARGET_SAMPLE))
            return Acceptance(path, [tree.tokens[i] for i in path] + [y])
        child = children[0]
        x = tree.tokens[child]
        q = tree.q[child].to(p.device).float()
        ratio = float(p[x]) / max(float(q[x]), 1e-30)
        if keyed_uniform(seed, pos, ACCEPT) < min(1.0, ratio):
            path.append(child)
            node = child
            continue
        residual = (p - q).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:
            residual = p
        y = sample_with(residual / residual.sum(), keyed_uniform(seed, pos, RESIDUAL))
        return Acceptance(path, [tree.tokens[i] for i in path] + [y])
