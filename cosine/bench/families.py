"""The family matrix: tiny random-weight models of each model family, built from configs (nothing downloaded),
run through the engine with a drafter of the same family and compared with what the target alone produces.

Each family gets a target and a drafter (the target with noise on its weights) sharing one tokenizer;
families with sliding windows get a 24-token window so that prompts of 60+ tokens run past it; Qwen2's pair
pads its embedding tables to different sizes, as Qwen2.5-0.5B and -32B do. Columns: greedy output identical
to HF ``generate`` (prompts inside the window, then prompts past it) and seeded sampling identical with
speculation off and on. A greedy difference where the target's top two logits lie within ``NEAR_TIE_GAP`` is
a named near-tie.
"""

from __future__ import annotations

import pathlib
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import transformers as tf

from cosine.errors import ModelLoadError
from cosine.sampling_params import SamplingParams

WINDOW = 24  # sliding window of the families that have one: the long prompts run well past it
NEAR_TIE_GAP = 1e-4  # float32 logits: a greedy pick decided by less than this is a numerical near-tie
SHORT, LONG = (8, 16, 20), (60, 90)  # prompt lengths inside and past the window


def _llama_like(vocab: int, hidden: int, layers: int, **extra) -> dict:
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None,
                eos_token_id=None, pad_token_id=None, **extra)


def _configs(vocab: int, hidden: int, layers: int, pad: int) -> dict[str, tuple[type, type, dict]]:
    neox = _llama_like(vocab, hidden, layers)
    neox.pop("num_key_value_heads")
    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, _llama_like(vocab, hidden, layers)),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM,
                  _llama_like(vocab + pad, hidden, layers, use_sliding_window=True, sliding_window=WINDOW,
                              max_window_layers=layers // 2)),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, _llama_like(vocab, hidden, layers, sliding_window=WINDOW)),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM,
                   _llama_like(vocab, hidden, layers, head_dim=hidden // 4, sliding_window=WINDOW,
                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
                   _llama_like(vocab, hidden, layers, head_dim=hidden // 4, sliding_window=WINDOW,
                               sliding_window_pattern=2)),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, _llama_like(vocab, hidden, layers, sliding_window=WINDOW)),
        "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, neox),
        "opt": (tf.OPTConfig, tf.OPTForCausalLM,
                dict(vocab_size=vocab, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                     num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=hidden,
                     bos_token_id=None, eos_token_id=None, pad_token_id=None)),
    }


FAMILIES = tuple(_configs(1, 8, 2, 0))


DRAFTER_NOISE = 0.05  # a drafter is the target with this much noise (x each tensor's spread) on its weights


def build(family: str, vocab: int, seed: int, drafter: bool = False) -> torch.nn.Module:
    """A random-weight 4-layer model of ``family`` over ``vocab`` ids; with ``drafter``, the same model with
    noise on its weights (so that drafts are often but not always accepted: both paths of verification run)
    and, for Qwen2, its table padded to another size, as Qwen2.5's model sizes pad theirs."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; have {FAMILIES}")
    config_cls, model_cls, kwargs = _configs(vocab, 64, 4, 64)[family]
    torch.manual_seed(seed)
    config = config_cls(**kwargs)
    config.initializer_range = 0.1  # sharper distributions than the default: fewer near-ties in greedy picks
    model = model_cls(config).eval()
    if drafter:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                if p.numel() > 1:
                    p.add_(torch.randn(p.shape, generator=g) * p.std() * DRAFTER_NOISE)
        if family == "qwen2":
            model.resize_token_embeddings(config.vocab_size + 64, mean_resizing=False)
    return model


def save_pair(family: str, folder: str | pathlib.Path, tokenizer_dir: str | pathlib.Path, vocab: int,
              seed: int = 0) -> tuple[pathlib.Path, pathlib.Path]:
    """Save a target and a drafter of ``family``, each with the tokenizer of ``tokenizer_dir``."""
    out = []
    for role, drafter in (("target", False), ("drafter", True)):
        path = pathlib.Path(folder) / family / role
        build(family, vocab, seed, drafter).save_pretrained(str(path))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(pathlib.Path(tokenizer_dir) / name, path / name)
        out.append(path)
    return out[0], out[1]


@dataclass
class FamilyResult:
    family: str
    attention: str = ""
    window: int | None = None
    refused: str | None = None  # why the engine refused the family at load
    greedy: int = 0  # prompts inside the window whose greedy output equals HF generate's
    greedy_long: int = 0  # prompts past the window
    near_ties: int = 0
    sampled: int = 0  # seeded samples identical with speculation off and on
    prompts: int = 0
    prompts_long: int = 0
    samples: int = 0
    acceptance: float = 0.0  # drafted tokens accepted (random weights: low, but drafts are verified)
    seconds: float = 0.0


def _gap(model, tokens: list[int]) -> float:
    with torch.no_grad():
        top = model(input_ids=torch.tensor([tokens])).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1])


def hf_greedy(model, prompt: list[int], new: int) -> list[int]:
    """HF ``generate``'s greedy continuation of ``prompt``: ``new`` tokens, no end token, every prompt position
    attended (no id is taken for padding)."""
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _greedy_matches(engine, target, prompts: list[list[int]], new: int) -> tuple[int, int, float]:
    """(prompts matching HF generate, near-ties, acceptance) for greedy decoding of ``prompts``."""
    seqs = engine.generate(prompts, SamplingParams(max_new_tokens=new, ignore_eos=True), drafter="d")
    same = ties = 0
    for prompt, seq in zip(prompts, seqs):
        ref = hf_greedy(target, prompt, new)
        if ref == seq.output_ids:
            same += 1
            continue
        j = next((i for i, (a, b) in enumerate(zip(ref, seq.output_ids)) if a != b), len(ref))
        ties += _gap(target, prompt + ref[:j]) < NEAR_TIE_GAP
    drafted = sum(s.stats.drafted for s in seqs)
    return same, ties, sum(s.stats.accepted for s in seqs) / drafted if drafted else 0.0


def check_family(family: str, vocab: int = 512, new_tokens: int = 24, seed: int = 0) -> FamilyResult:
    """Build ``family``'s pair and run the matrix's checks through the engine."""
    from cosine.engine.families import attention_implementation, layout_of
    from cosine.engine.speculative import SpecConfig, SpeculativeEngine

    res = FamilyResult(family)
    t0 = time.perf_counter()
    target, drafter = build(family, vocab, seed), build(family, vocab, seed, drafter=True)
    res.attention = attention_implementation(target.config)
    for m in (target, drafter):
        m.config._attn_implementation = res.attention
    try:
        layout = layout_of(target, family)
        engine = SpeculativeEngine(target, {"d": drafter}, eos_id=None, config=SpecConfig(k=4, tree_width=2))
    except ModelLoadError as exc:
        res.refused = str(exc)
        return res
    res.window = next((w for w in layout.windows.values() if w is not None), None)
    g = torch.Generator().manual_seed(seed)
    short = [torch.randint(vocab, (n,), generator=g).tolist() for n in SHORT]
    long = [torch.randint(vocab, (n,), generator=g).tolist() for n in LONG]
    res.prompts, res.prompts_long = len(short), len(long)
    res.greedy, ties, acc = _greedy_matches(engine, target, short, new_tokens)
    res.greedy_long, ties_long, _ = _greedy_matches(engine, target, long, new_tokens)
    res.near_ties, res.acceptance = ties + ties_long, round(acc, 3)
    params = [SamplingParams(max_new_tokens=new_tokens, temperature=0.9, top_p=0.95, seed=seed + i, ignore_eos=True)
              for i in range(len(short + long))]
    on = engine.generate(short + long, params, drafter="d")
    off = engine.generate(short + long, params, speculative=False)
    res.samples = len(params)
    res.sampled = sum(a.output_ids == b.output_ids for a, b in zip(on, off))
    res.seconds = round(time.perf_counter() - t0, 2)
    return res


def run_matrix(families: tuple[str, ...] = FAMILIES, progress: Callable[[str], None] | None = None) -> dict:
    results = []
    for family in families:
        if progress:
            progress(family)
        results.append(asdict(check_family(family)))
    return {"families": results, "transformers": tf.__version__, "torch": torch.__version__}


def matrix_markdown(payload: dict) -> str:
    def frac(a: int, b: int) -> str:
        return f"{'✓' if a == b else '✗'} {a}/{b}"

    lines = ["| family | attention | window | greedy = HF generate | past the window | seeded sampling, spec on = off "
             "| acceptance |", "|---|---|---|---|---|---|---|"]
    for r in payload["families"]:
        if r["refused"]:
            lines.append(f"| {r['family']} | {r['attention']} | | refused at load: {r['refused']} | | | |")
            continue
        ties = f" ({r['near_ties']} near-ties)" if r["near_ties"] else ""
        lines.append(f"| {r['family']} | {r['attention']} | {r['window'] or 'none'} | "
                     f"{frac(r['greedy'], r['prompts'])}{ties} | {frac(r['greedy_long'], r['prompts_long'])} | "
                     f"{frac(r['sampled'], r['samples'])} | {r['acceptance']:.0%} |")
    lines.append(f"\ntransformers {payload['transformers']}, torch {payload['torch']}; random-weight models built "
                 "from configs (4 layers; the drafter is the target with noise on its weights), float32 on CPU, "
                 "k=4 with 2 candidates per position.")
    return "\n".join(lines)
