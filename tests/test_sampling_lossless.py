"""Speculative sampling reproduces the target's distribution (chi-square, fixed seeds).

A small table-driven world: a "target" and a "drafter" are next-token logit tables over a vocabulary of
8 tokens, conditioned on the previous token. Each trial decodes two tokens speculatively (drafting again
after a round that emitted fewer) and the joint distribution of the two tokens is compared with the
target's exact joint p(t1) p(t2 | t1) after the request's temperature / top-k / top-p processing. The
same test run with a deliberately wrong acceptance rule must fail (negative control).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from cosine.engine import acceptance
from cosine.engine.sampling import DRAFT, keyed_uniform, probabilities, sample_with
from cosine.engine.tree import DraftTree
from cosine.sampling_params import SamplingParams

V = 8
TRIALS = 6000
ALPHA = 1e-3  # the rule is rejected below this p-value


def tables(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn((V + 1, V), generator=g) * 1.5  # row V = the prompt's last token
    drafter = target + torch.randn((V + 1, V), generator=g) * 1.5  # correlated but clearly different
    return target, drafter


def draft(drafter_tab, prev: int, k: int, width: int, params: SamplingParams, sampled: bool, seed: int, pos: int):
    tree = DraftTree(q=[] if sampled else None)
    parent, last = -1, prev
    for d in range(k):
        logits = drafter_tab[last]
        if sampled:
            q = probabilities(logits, params)
            tok = sample_with(q, keyed_uniform(seed, pos + d, DRAFT))
            parent = tree.add(tok, parent)
            tree.q.append(q)
        else:
            order = torch.argsort(logits, descending=True).tolist()
            spine = tree.add(order[0], parent)
            for alt in order[1:width]:
                tree.add(alt, parent)
            parent, tok = spine, order[0]
        last = tok
    return tree


def node_logits(target_tab, prev: int, tree: DraftTree) -> torch.Tensor:
    """Target logits at the root and at every node (each node's context = its own token)."""
    rows = [target_tab[prev]] + [target_tab[t] for t in tree.tokens]
    return torch.stack(rows)


def run_trials(rule, params: SamplingParams, sampled: bool, width: int, k: int = 2) -> np.ndarray:
    target_tab, drafter_tab = tables()
    counts = np.zeros((V, V))
    for trial in range(TRIALS):
        seed = 1_000_003 * trial + 17
        out: list[int] = []
        prev = V
        while len(out) < 2:
            tree = draft(drafter_tab, prev, k, width, params, sampled, seed, len(out))
            acc = rule(node_logits(target_tab, prev, tree), tree, params, seed, len(out))
            out += acc.tokens
            prev = out[-1]
        counts[out[0], out[1]] += 1
    return counts


def expected_joint(params: SamplingParams) -> np.ndarray:
    target_tab, _ = tables()
    p1 = probabilities(target_tab[V], params).double().numpy()
    joint = np.zeros((V, V))
    for a in range(V):
        joint[a] = p1[a] * probabilities(target_tab[a], params).double().numpy()
    return joint


def chi_square_pvalue(counts: np.ndarray, joint: np.ndarray) -> float:
    exp = joint.flatten() / joint.sum() * counts.sum()
    obs = counts.flatten()
    assert obs[exp == 0].sum() == 0, "a token with zero target probability was emitted"
    # Merge cells with small expectations into one bin so the chi-square approximation holds.
    small = exp < 5
    obs_b = np.append(obs[~small], obs[small].sum())
    exp_b = np.append(exp[~small], exp[small].sum())
    if exp_b[-1] == 0:
        obs_b, exp_b = obs_b[:-1], exp_b[:-1]
    return float(chisquare(obs_b, exp_b).pvalue)


PARAMS = {
    "T1": SamplingParams(temperature=1.0),
    "T0.7": SamplingParams(temperature=0.7),
    "T1-top_p0.9": SamplingParams(temperature=1.0, top_p=0.9),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PARAMS))
@pytest.mark.parametrize("kind", ["chain-with-q", "chain-one-hot", "tree-one-hot"])
def test_speculative_sampling_matches_target(name, kind):
    params = PARAMS[name]
    sampled = kind == "chain-with-q"
    width = 3 if kind == "tree-one-hot" else 1
    counts = run_trials(acceptance.accept, params, sampled, width)
    pvalue = chi_square_pvalue(counts, expected_joint(params))
    assert pvalue > ALPHA, f"{kind} at {name}: chi-square p={pvalue:.2e}"


def wrong_rejection_rule(logits, tree, params, seed, position):
    """Classic bug: after rejecting a drafted token, resample from p instead of the residual max(0, p - q)."""
    from cosine.engine.acceptance import Acceptance
    from cosine.engine.sampling import ACCEPT, RESIDUAL, TARGET_SAMPLE

    node, path = -1, []
    while True:
        pos = position + len(path)
        p = probabilities(logits[node + 1], params)
        kids = tree.children(node)
        if not kids:
            return Acceptance(path, [tree.tokens[i] for i in path] + [sample_with(p, keyed_uniform(seed, pos, TARGET_SAMPLE))])
        x, q = tree.tokens[kids[0]], tree.q[kids[0]]
        if keyed_uniform(seed, pos, ACCEPT) < min(1.0, float(p[x] / q[x])):
            path.append(kids[0])
            node = kids[0]
            continue
        return Acceptance(path, [tree.tokens[i] for i in path] + [sample_with(p, keyed_uniform(seed, pos, RESIDUAL))])


def wrong_one_hot_rule(logits, tree, params, seed, position):
    """Bug: accept a deterministic draft whenever the target gives it at least 10% probability."""
    from cosine.engine.acceptance import Acceptance
    from cosine.engine.sampling import TARGET_SAMPLE

    node, path = -1, []
    while True:
        p = probabilities(logits[node + 1], params)
        kids = [c for c in tree.children(node) if float(p[tree.tokens[c]]) > 0.1]
        if kids:
            path.append(kids[0])
            node = kids[0]
            continue
        y = sample_with(p, keyed_uniform(seed, position + len(path), TARGET_SAMPLE))
        return Acceptance(path, [tree.tokens[i] for i in path] + [y])


@pytest.mark.slow
@pytest.mark.parametrize("rule, sampled, width", [(wrong_rejection_rule, True, 1), (wrong_one_hot_rule, False, 2)])
def test_negative_control_wrong_rule_is_rejected(rule, sampled, width):
    params = PARAMS["T1"]
    counts = run_trials(rule, params, sampled, width)
    pvalue = chi_square_pvalue(counts, expected_joint(params))
    assert pvalue < ALPHA, f"the chi-square test failed to detect a wrong rule (p={pvalue:.2e})"
