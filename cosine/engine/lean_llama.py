"""A lean forward for Llama-family models over the engine's KV cache: the same ops as transformers', less Python.

Transformers' forward wraps every call in decorators (output capture, config defaults, deprecated-argument
checks on the model and on each layer), builds a causal mask through its generic mask machinery and returns
output dataclasses; on the demo zoo's target that host work is about a tenth of a pass on one CPU core, and a
verifier or drafter pays it on every pass. This module runs the very same modules and tensor ops in the same
order (RMSNorm and the MLP as modules, transformers' rotary embedding, ``apply_rotary_pos_emb`` and SDPA
attention function), so logits are bit-identical; ``tests/test_lean_llama.py`` checks that against the
model's own forward. Models it does not know (:func:`supports`) keep transformers' forward.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import LlamaForCausalLM, apply_rotary_pos_emb

from cosine.engine.models import spread


def supports(model: torch.nn.Module) -> bool:
    """Whether :func:`forward` reproduces ``model``'s own forward: a plain Llama with SDPA attention (no
    quantisation or parallelism plans that swap its layers' ops, no sliding window, eval mode) on one device
    (it calls the layers' submodules directly, around accelerate's hooks that move a spread model's tensors)."""
    cfg = getattr(model, "config", None)
    return (
        type(model) is LlamaForCausalLM
        and not spread(model)
        and getattr(cfg, "_attn_implementation", None) == "sdpa"
        and getattr(cfg, "pretraining_tp", 1) == 1
        and getattr(model, "hf_quantizer", None) is None
        and not model.training
    )


def _causal(q: int, past: int, device: torch.device) -> torch.Tensor:
    """``[1, 1, q, past + q]`` bool: new token ``i`` sees every cached slot and the new tokens up to itself
    (what transformers' SDPA mask is for a chain fed after ``past`` cached slots)."""
    keys = torch.arange(past + q, device=device)
    return (keys[None, :] <= torch.arange(past, past + q, device=device)[:, None])[None, None]


@torch.inference_mode()
def forward(model: LlamaForCausalLM, input_ids: torch.Tensor, position_ids: torch.Tensor,
            attention_mask: torch.Tensor | None, cache, logits_to_keep: int | torch.Tensor = 0) -> torch.Tensor:
    """Logits ``[rows, kept, vocab]`` for ``input_ids`` ``[rows, Q]``, writing the new keys and values into
    ``cache`` (the engine's cache of :class:`~cosine.engine.kv_cache.SlotLayer`).

    ``attention_mask``: ``None`` (a chain after the cache's used slots, the same for every row) or a
    boolean ``[rows, 1, Q, span]`` mask, as the runner builds. ``logits_to_keep``: 0 = every position, an int
    ``n`` = the last ``n``, a ``[rows, k]`` tensor = those positions per row."""
    inner = model.model
    hidden = inner.embed_tokens(input_ids)
    q = input_ids.shape[1]
    mask = attention_mask
    if mask is None and q > 1:
        past = cache.get_seq_length()
        if past > 0:  # transformers' mask for a causal block after the cache; none (is_causal) for a prefill
            mask = _causal(q, past, hidden.device)
    cos, sin = inner.rotary_emb(hidden, position_ids=position_ids)
    rows = hidden.shape[0]
    for layer in inner.layers[: inner.config.num_hidden_layers]:
        attn = layer.self_attn
        residual = hidden
        x = layer.input_layernorm(hidden)
        shape = (rows, q, -1, attn.head_dim)
        query = attn.q_proj(x).view(shape).transpose(1, 2)
        key = attn.k_proj(x).view(shape).transpose(1, 2)
        value = attn.v_proj(x).view(shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        key, value = cache.update(key, value, attn.layer_idx)
        out, _ = sdpa_attention_forward(attn, query, key, value, mask, dropout=0.0, scaling=attn.scaling)
        out = out.reshape(rows, q, -1).contiguous()
        hidden = residual + attn.o_proj(out)
        residual = hidden
        hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
    hidden = inner.norm(hidden)
    if isinstance(logits_to_keep, torch.Tensor):
        hidden = torch.take_along_dim(hidden, logits_to_keep[..., None], dim=1)
    elif logits_to_keep:
        hidden = hidden[:, -logits_to_keep:, :]
    return model.lm_head(hidden)
