"""Whether a drafter speaks the target's token ids: compared by tokenizer, not by ``config.vocab_size``.

Families pad their embedding tables to different sizes (Qwen2.5-0.5B has 151936 rows, Qwen2.5-32B 152064,
one tokenizer of 151665 tokens), so the sizes say nothing. Two tokenizers are compatible when they map a
fixed set of probe strings and their special tokens to the same ids and hold as many tokens: then every id
either proposes means the same string. :func:`identity` condenses that into a fingerprint a drafter worker
announces in its heartbeat, so a verifier can check every drafter it hears from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from cosine.errors import ModelLoadError

# Probe strings: prose, code, digits, whitespace runs, punctuation, accents, CJK, emoji and a JSON record,
# so tokenizers that differ in merges, normalisation or byte fallback give different ids somewhere.
PROBES = (
    "The quick brown fox jumps over the lazy dog.",
    "def main(argv):\n    return sum(int(x) for x in argv[1:])  # total\n",
    "0 1 12 123 1234 12345 3.14159 -42 1e-9 0xFF",
    "  two spaces,\tone tab,\n\nnew lines   and trailing   ",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "café naïve Zürich Ελληνικά русский",
    "漢字かなカナ 한국어",
    "emoji 🙂🚀 and symbols ∑ √ ∞",
    '{"id": 7, "name": "Ada", "tags": ["x", "y"], "ok": true}',
)


@dataclass(frozen=True)
class TokenizerIdentity:
    """A tokenizer in brief: ``fingerprint`` of its probe encodings and special tokens, ``tokens`` it holds."""

    fingerprint: str
    tokens: int

    def describe(self) -> str:
        return f"tokenizer {self.fingerprint}, {self.tokens} tokens"


def _specials(tokenizer) -> list:
    named = [(name, getattr(tokenizer, f"{name}_token", None), getattr(tokenizer, f"{name}_token_id", None))
             for name in ("bos", "eos", "unk", "pad")]
    added = sorted((str(t), int(i)) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items())
    return [named, added]


def identity(tokenizer) -> TokenizerIdentity:
    """The fingerprint of ``tokenizer``: its ids for every probe string and its special tokens."""
    probes = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROBES]
    blob = json.dumps([probes, _specials(tokenizer), len(tokenizer)], sort_keys=True, default=str)
    return TokenizerIdentity(hashlib.sha256(blob.encode()).hexdigest()[:16], len(tokenizer))


def first_difference(a, b) -> str:
    """Where two tokenizers part: the first probe string they encode differently, or their special tokens."""
    for p in PROBES:
        x, y = a(p, add_special_tokens=False)["input_ids"], b(p, add_special_tokens=False)["input_ids"]
        if list(x) != list(y):
            return f"{p[:24]!r} is {list(x)[:6]}... against {list(y)[:6]}..."
    if len(a) != len(b):
        return f"{len(a)} against {len(b)} tokens"
    return "their special tokens differ"


def check_compatible(target_name: str, target_tok, drafter_name: str, drafter_tok) -> None:
    """Refuse a drafter whose tokenizer maps strings to other ids than the target's, naming both."""
    t, d = identity(target_tok), identity(drafter_tok)
    if t != d:
        raise ModelLoadError(
            f"drafter {drafter_name} [{d.describe()}] does not share the tokenizer of target {target_name} "
            f"[{t.describe()}]: {first_difference(drafter_tok, target_tok)}"
        )


def fit_logits(logits: torch.Tensor, size: int) -> torch.Tensor:
    """``logits`` over ``size`` ids: cut (ids past the shared vocabulary are padding rows) or padded with
    ``-inf`` (ids the model has no row for are never proposed)."""
    have = logits.shape[-1]
    if have == size:
        return logits
    if have > size:
        return logits[..., :size]
    pad = logits.new_full((*logits.shape[:-1], size - have), float("-inf"))
    return torch.cat([logits, pad], dim=-1)
