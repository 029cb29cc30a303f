"""Small helpers shared by tests."""

from __future__ import annotations

import os
import weakref

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cosine.sampling_params import SamplingParams

TEST_DEVICE = os.environ.get("COSINE_TEST_DEVICE", "cpu")
TEST_DTYPE = os.environ.get("COSINE_TEST_DTYPE", "float32")


def tiny_llama(vocab: int = 97, seed: int = 0, layers: int = 2, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


# A greedy divergence is a numerical near-tie when the target's top-2 logit gap is below this. In float32
# that is 1e-4; in 16-bit types the logits themselves are rounded to a few hundredths, so the gap allowed
# is a few units of their last place (documented, and printed for every case).
NEAR_TIE_GAP = {"float32": 1e-4, "bfloat16": 0.125, "float16": 0.02}.get(TEST_DTYPE, 1e-4)
# KV rollback vs recompute: the same arithmetic in another order, so equal up to rounding of the dtype.
KV_TOLERANCE = {"float32": (2e-5, 1e-4), "bfloat16": (5e-2, 5e-2),
                "float16": (5e-3, 5e-3)}.get(TEST_DTYPE, (2e-5, 1e-4))
# How many near-ties a run may show before they stop looking like chance: rare in float32; in 16-bit types
# logits are rounded to a few hundredths, so exact ties between the top two are common.
MAX_NEAR_TIE_SHARE = {"float32": 0.04, "bfloat16": 0.15, "float16": 0.1}.get(TEST_DTYPE, 0.04)
# Sampling: a keyed sample is a near-tie when its uniform lies this close to a boundary of the target's CDF.
NEAR_TIE_CDF = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 4e-3}.get(TEST_DTYPE, 1e-5)
# Top-p: a token is on the nucleus edge when the probability mass ranked before it is this close to top_p.
NUCLEUS_EDGE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 4e-3}.get(TEST_DTYPE, 1e-5)


def first_divergence(out: list[int], ref: list[int]) -> int | None:
    """Index of the first differing token (or the shorter length when one is a prefix); None if equal."""
    if out == ref:
        return None
    return next((n for n, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out), len(ref)))


def top2_gap(model, tokens: list[int]) -> float:
    """The target's top-2 logit gap after ``tokens``: how close greedy decoding was to a tie there."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens], device=model.device)).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


_TARGET_OUTPUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def target_outputs(engine, prompts: list[list[int]], max_new: int | list[int]) -> list[list[int]]:
    """The target's own greedy tokens (speculation off) for each prompt, ``max_new`` one for all or one per
    prompt. Those not seen before are decoded in one batch (on the CPU a batch of one costs about ten times
    as much per token), and every answer is kept for the session: the pipeline tests compare the same
    prompts again and again."""
    ns = [max_new] * len(prompts) if isinstance(max_new, int) else list(max_new)
    known = _TARGET_OUTPUTS.setdefault(engine, {})
    keys = [(tuple(p), n) for p, n in zip(prompts, ns)]
    missing = list(dict.fromkeys(k for k in keys if k not in known))
    if missing:
        seqs = engine.generate([list(p) for p, _ in missing], [SamplingParams(max_new_tokens=n) for _, n in missing],
                               speculative=False)
        known.update((k, list(s.output_ids)) for k, s in zip(missing, seqs))
    return [list(known[k]) for k in keys]


def greedy_divergences(model, prompts, outputs, refs):
    """Split mismatches into (near_ties, failures), each a list of (index, position, gap)."""
    ties, failures = [], []
    for i, (out, ref) in enumerate(zip(outputs, refs)):
        j = first_divergence(out, ref)
        if j is None:
            continue
        gap = top2_gap(model, prompts[i] + ref[:j])
        (ties if gap < NEAR_TIE_GAP else failures).append((i, j, gap))
    return ties, failures


def assert_greedy_exact(engine, prompts, outputs, capsys, max_new) -> None:
    """The outputs equal the target's own greedy tokens (:func:`target_outputs`) but for named near-ties, which
    are printed; any other difference fails."""
    refs = target_outputs(engine, prompts, max_new)
    ties, failures = greedy_divergences(engine.verifier.runner.model, prompts, outputs, refs)
    with capsys.disabled():
        for i, j, gap in ties:
            print(f"\n[near-tie] request {i}: first difference at {j}, top-2 gap {gap:.2e}")
    assert not failures, failures
