"""Loading target and drafter models (any Hugging Face causal LM) with device and dtype choices."""

from __future__ import annotations

import logging
import pathlib

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from cosine.engine.families import attention_implementation
from cosine.engine.vocab import check_compatible
from cosine.errors import InvalidParameterError, ModelLoadError

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise InvalidParameterError("device", str(exc)) from exc


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (fast there, and exact), bfloat16 on GPUs."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InvalidParameterError("dtype", f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_model(path: str | pathlib.Path, device: str | None = None, dtype: str | torch.dtype | None = None):
    """Load a causal LM for inference with the attention its family needs
    (:func:`~cosine.engine.families.attention_implementation`); raises :class:`ModelLoadError` with the path
    on failure."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        config = AutoConfig.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dt,
                                                     attn_implementation=attention_implementation(config))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a causal LM from {path}: {exc}") from exc
    model.to(dev).eval()
    model.requires_grad_(False)
    return model


def load_tokenizer(path: str | pathlib.Path, required: bool = True) -> PreTrainedTokenizerBase | None:
    """The tokenizer in a model folder; with ``required=False``, None when the folder has none."""
    if not required and not any((pathlib.Path(path) / n).exists() for n in ("tokenizer.json", "tokenizer_config.json")):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {path}: {exc}") from exc


def check_drafter(target_name: str, target, target_tok, drafter_name: str, drafter, drafter_tok) -> None:
    """Refuse a drafter that does not speak the target's token ids, naming both: compared by tokenizer
    (:mod:`cosine.engine.vocab`) when both have one, else by vocabulary size."""
    if target_tok is not None and drafter_tok is not None:
        check_compatible(target_name, target_tok, drafter_name, drafter_tok)
        return
    t, d = int(target.config.vocab_size), int(drafter.config.vocab_size)
    if t != d:
        raise ModelLoadError(f"drafter {drafter_name} has {d} ids but target {target_name} has {t} ids and "
                             "neither names a tokenizer to compare; a drafter must share the target's tokenizer")
