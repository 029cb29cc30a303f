"""Turning logits into distributions and tokens, identically on every path.

``probabilities`` applies temperature, then top-k, then top-p; the target-only path, the speculative
verifier and the drafters all call it, so a request's distribution is the same wherever it is computed.

Randomness is *keyed*: the uniform number used for output position ``n`` of a request with seed ``s``
is a hash of ``(s, n, purpose)``. Sampling therefore does not depend on how many random numbers other
requests or earlier rounds consumed, so seeded requests are reproducible however they are batched, and
the speculative path draws the very same target sample at each position as the target-only path.
"""

from __future__ import annotations

import hashlib
import os
import struct

import torch

from cosine.sampling_params import SamplingParams

# Purposes of keyed uniforms.
TARGET_SAMPLE = 0  # the target's own sample at a position (plain steps, bonus tokens, one-hot verification)
ACCEPT = 1  # accept/reject of a drafted token that came with its probabilities
RESIDUAL = 2  # resampling from the residual distribution after a rejection
DRAFT = 3  # a drafter sampling its proposal


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") >> 1


def keyed_uniform(seed: int, position: int, purpose: int) -> float:
    """A uniform number in [0, 1) determined by (seed, position, purpose)."""
    digest = hashlib.blake2b(struct.pack("<QQQ", seed & (2**64 - 1), position, purpose), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) * (1.0 / (1 << 53))


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Distribution over the vocabulary (last dim) after temperature, top-k and top-p; float32."""
    logits = logits.float()
    if params.greedy:
        out = torch.zeros_like(logits)
        out.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
        return out
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_sorted = before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_with(probs: torch.Tensor, u: float) -> int:
    """Inverse-CDF sample from a 1-D distribution with the uniform ``u`` (float64 accumulation)."""
    cdf = probs.double().cumsum(dim=0)
    total = float(cdf[-1])
    point = torch.tensor([u * total], dtype=torch.float64, device=cdf.device)
    idx = int(torch.searchsorted(cdf, point, right=True)[0])
    idx = min(idx, probs.shape[0] - 1)
    # Never return a zero-probability token because of rounding at the top end.
    while probs[idx] <= 0 and idx > 0:
        idx -= 1
    return idx


def cdf_margin(probs: torch.Tensor, u: float) -> float:
    """Distance of ``u`` from the nearest CDF boundary: how close a keyed sample was to flipping."""
    cdf = probs.double().cumsum(dim=0)
    cdf = cdf / cdf[-1]
    return float((cdf - u).abs().min())
