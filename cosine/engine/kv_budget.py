"""What the KV cache costs: bytes per token slot from a model's config, a byte budget as token slots, and how
the cache's buffers grow (in bounded steps, never past a budget that the slots in use fit in).

One token slot of one row holds a key and a value per layer: ``layers x kv_heads x head_dim x 2 x dtype
bytes``. The cache (:mod:`cosine.engine.kv_cache`) keeps ``[rows, kv_heads, slots, head_dim]`` buffers per
layer, so its allocation is ``rows x slots`` token slots at that price: a budget of token slots bounds that
rectangle. Pure arithmetic: no torch, no model.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace

SLOT_CHUNK = 64  # slots grow to a multiple of this
GROWTH = 0.25  # and by at least this share of what they had (so a long generation reallocates O(log) times)

_DTYPE_BYTES = {"float64": 8, "double": 8, "float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2,
                "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1, "uint8": 1}


def dtype_bytes(dtype) -> int:
    """Bytes per element of ``dtype``: a ``torch.dtype`` (anything with ``itemsize``), its name or a number."""
    if isinstance(dtype, int):
        return dtype
    size = getattr(dtype, "itemsize", None)
    if isinstance(size, int):
        return size
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}")
    return _DTYPE_BYTES[name]


def _first(config, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def kv_shape(config) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a transformers config (or a mapping with the same keys): Llama-style
    (``num_key_value_heads``, optional ``head_dim``), GPT-NeoX/OPT-style (``hidden_size`` / heads), GPT-2-style
    (``n_layer``, ``n_head``, ``n_embd``); multimodal configs by their text config. Key/value heads default
    to the attention heads (one for multi-query models)."""
    if isinstance(config, Mapping):
        config = SimpleNamespace(**config)
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        config = get_text()
    layers = _first(config, ("num_hidden_layers", "n_layer", "num_layers"))
    heads = _first(config, ("num_attention_heads", "n_head", "num_heads"))
    if layers is None or heads is None:
        raise ValueError(f"cannot tell the layers and attention heads of a {type(config).__name__}")
    kv_heads = _first(config, ("num_key_value_heads", "num_kv_heads", "n_head_kv"))
    if kv_heads is None:
        kv_heads = 1 if getattr(config, "multi_query", False) else heads
    head_dim = _first(config, ("head_dim",))
    if head_dim is None:
        hidden = _first(config, ("hidden_size", "n_embd", "d_model"))
        if hidden is None:
            raise ValueError(f"cannot tell the head size of a {type(config).__name__}")
        head_dim = hidden // heads
    return layers, kv_heads, head_dim


def bytes_per_token(config, dtype) -> int:
    """Bytes one token slot of one row takes in the cache: keys and values of every layer."""
    layers, kv_heads, head_dim = kv_shape(config)
    return layers * kv_heads * head_dim * 2 * dtype_bytes(dtype)


def capacity_tokens(budget_bytes: int | None, config, dtype) -> int | None:
    """The token slots a byte budget holds (None: no budget)."""
    if budget_bytes is None:
        return None
    return int(budget_bytes) // bytes_per_token(config, dtype)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def grow(need: int, have: int, step: int = SLOT_CHUNK) -> int:
    """A new capacity for ``need`` when ``have`` is too small: ``need`` rounded up to a multiple of ``step``,
    and at least ``have`` plus a quarter (so growing one slot at a time reallocates rarely), not doubling."""
    if need <= have:
        return have
    return max(_round_up(need, step), _round_up(have + int(have * GROWTH), step))


def plan(need_rows: int, need_slots: int, have_rows: int, have_slots: int,
         limit: int | None = None) -> tuple[int, int]:
    """The buffer shape ``(rows, slots)`` to hold ``need_rows x need_slots`` when ``(have_rows, have_slots)``
    does not: rows grow one step at a time (a quarter more, at least what is needed), slots by :func:`grow`.
    With ``limit`` (token slots), spare rows and slots are given back until ``rows x slots <= limit``; only
    a need larger than the limit itself goes past it (exactly to the need)."""
    rows = have_rows if need_rows <= have_rows else grow(need_rows, have_rows, 1)
    slots = grow(need_slots, have_slots)
    if limit is not None and rows * slots > limit:
        slots = max(need_slots, min(slots, limit // max(need_rows, 1)))
        rows = max(need_rows, min(rows, limit // max(slots, 1)))
    return rows, slots
