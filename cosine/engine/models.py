"""Loading target and drafter models (any Hugging Face causal LM) with device and dtype choices."""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

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
    """Load a causal LM for inference; raises :class:`ModelLoadError` with the path on failure."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dt, attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a causal LM from {path}: {exc}") from exc
    model.to(dev).eval()
    model.requires_grad_(False)
    return model


def load_tokenizer(path: str | pathlib.Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {path}: {exc}") from exc


def vocabulary_of(path: str | pathlib.Path, model) -> tuple[int, str | None]:
    """A model's vocabulary: its size and, when its folder has a tokenizer, a digest of the token table."""
    tok_file = pathlib.Path(path) / "tokenizer.json"
    digest = None
    if tok_file.exists():
        vocab = json.loads(tok_file.read_text()).get("model", {}).get("vocab", {})
        digest = hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest()[:12]
    return int(model.config.vocab_size), digest


def _describe(vocab: tuple[int, str | None]) -> str:
    return f"{vocab[0]} ids" + (f", tokenizer {vocab[1]}" if vocab[1] else "")


def check_same_vocabulary(target_path, target, drafter_path, drafter) -> None:
    """Refuse a drafter whose vocabulary differs from the target's, naming both."""
    t, d = vocabulary_of(target_path, target), vocabulary_of(drafter_path, drafter)
    if t[0] != d[0] or (t[1] and d[1] and t[1] != d[1]):
        raise ModelLoadError(
            f"drafter {drafter_path} has vocabulary [{_describe(d)}] but target {target_path} has "
            f"[{_describe(t)}]; a drafter must share the target's tokenizer"
        )
