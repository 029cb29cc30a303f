"""What the engine must know of a model family to run it exactly, read off its config and class.

The engine feeds token trees and rows of different lengths, so it builds attention masks itself, and a
custom 4D mask bypasses what transformers would build: a layer that attends through a sliding window
(Mistral, Gemma-2/3, Qwen2 with windows, Phi-3) must get a windowed mask from the engine, or its output
goes wrong past the window. :func:`layout_of` says which mask each layer takes and how the forward takes
them (one for every layer, or a dict keyed by layer kind); :func:`attention_implementation` picks the
attention kernel per family (eager where SDPA would drop soft-capping). What the engine cannot run
exactly is refused at load with the reason (:class:`~cosine.errors.ModelLoadError`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from cosine.errors import ModelLoadError

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass(frozen=True)
class AttentionLayout:
    """``windows``: each mask kind the layers use and its window (``None``: full causal attention);
    ``by_kind``: the forward takes a dict of masks keyed by kind (else one mask serves every layer);
    ``additive``: the attention adds the mask to its scores (eager), so it takes 0/-inf, not booleans."""

    windows: dict[str, int | None]
    by_kind: bool = False
    additive: bool = False

    @property
    def windowed(self) -> bool:
        return any(w is not None for w in self.windows.values())


def attention_implementation(config) -> str:
    """``eager`` where the family soft-caps attention scores (SDPA cannot, so it would change the model),
    otherwise ``sdpa``."""
    if getattr(config, "attn_logit_softcapping", None):
        return "eager"
    return "sdpa"


def _takes_mask_dict(model: torch.nn.Module) -> bool:
    """Whether the model's decoder reads a dict of masks keyed by layer kind (transformers' hybrid models)."""
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None) or model
    try:
        source = inspect.getsource(type(inner).forward)
    except (OSError, TypeError):
        return False
    return "attention_mask, dict)" in source


def _uses_window(model: torch.nn.Module) -> bool:
    """Whether a model without layer kinds applies ``config.sliding_window`` (its decoder builds a
    sliding-window mask when the window is set)."""
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None) or model
    try:
        return "create_sliding_window_causal_mask" in inspect.getsource(type(inner).forward)
    except (OSError, TypeError):
        return False


def layout_of(model: torch.nn.Module, name: str = "model") -> AttentionLayout:
    """The masks ``model`` needs from the engine; raises :class:`ModelLoadError` naming the reason where
    the engine cannot reproduce the model's own attention."""
    cfg = model.config
    family = getattr(cfg, "model_type", type(model).__name__)
    if getattr(cfg, "is_encoder_decoder", False):
        raise ModelLoadError(f"{name} ({family}) is an encoder-decoder model; CoSine serves decoder-only causal LMs")
    if getattr(cfg, "attention_chunk_size", None):
        raise ModelLoadError(f"{name} ({family}) uses chunked attention, which the engine's masks do not build")
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise ModelLoadError(f"{name} ({family}) takes no position_ids; the engine needs them to verify token trees")
    additive = getattr(cfg, "_attn_implementation", "sdpa") == "eager"
    window = getattr(cfg, "sliding_window", None)
    kinds = list(getattr(cfg, "layer_types", None) or [])
    if kinds:
        unknown = sorted(set(kinds) - {FULL, SLIDING})
        if unknown:
            raise ModelLoadError(f"{name} ({family}) has layers of kind {unknown}; the engine runs full and "
                                 "sliding-window attention only")
        if SLIDING in kinds and not window:
            raise ModelLoadError(f"{name} ({family}) has sliding-window layers but no sliding_window in its config")
        windows = {kind: (window if kind == SLIDING else None) for kind in dict.fromkeys(kinds)}
        by_kind = _takes_mask_dict(model)
        if len(windows) > 1 and not by_kind:
            raise ModelLoadError(f"{name} ({family}) mixes full and sliding-window layers but its forward takes a "
                                 "single mask, so the engine cannot give each layer its own")
        return AttentionLayout(windows, by_kind, additive)
    if window and _uses_window(model):
        return AttentionLayout({SLIDING: int(window)}, False, additive)
    return AttentionLayout({FULL: None}, False, additive)


def windowed_mask(mask: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
    """``mask`` (``[rows, 1, Q, span]`` bool) limited to keys less than ``window`` positions behind each
    query (transformers' convention: key position > query position - window)."""
    return mask & (key_pos[:, None, None, :] > query_pos[:, None, :, None] - window)


def to_model_mask(mask: torch.Tensor, layout: AttentionLayout, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask in the form the model's attention takes (additive 0/min for eager attention)."""
    if not layout.additive:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
