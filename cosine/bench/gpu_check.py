"""``cosine bench gpu``: a short check of the engine on one accelerator, a few minutes in all.

Models: the demo zoo's target, and random-weight models shaped like Llama-3-8B and Qwen2.5-7B with a few
layers (built from their configs, nothing downloaded). For each: target-only greedy decoding by the engine
against Hugging Face ``generate`` at batch 1 and 8, the time of a verify pass of 1, 5 and 9 chain tokens,
host syncs per pass, the share of a pass outside the device's kernels, peak memory, and whether the
engine's greedy output equals ``generate``'s. ``quick`` shrinks everything so the check runs on a CPU.
"""

from __future__ import annotations

import gc
import json
import logging
import pathlib
import platform
import random
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from cosine.bench.engine_bench import _hf_generate
from cosine.bench.report import environment
from cosine.engine.models import load_model, resolve_device, resolve_dtype
from cosine.engine.runner import ModelRunner
from cosine.engine.sequence import Sequence
from cosine.engine.speculative import SpecConfig, SpeculativeEngine
from cosine.engine.target import TargetVerifier
from cosine.engine.tree import DraftTree
from cosine.markdown import table
from cosine.sampling_params import SamplingParams
from cosine.zoo import paths

log = logging.getLogger(__name__)

BATCHES = (1, 8)
QS = (1, 5, 9)
PROFILED_Q = 5
SHAPES = {
    "llama3-8b-shaped": (LlamaConfig, dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                           num_key_value_heads=8, head_dim=128, vocab_size=128256,
                                           rope_theta=500000.0, max_position_embeddings=8192)),
    "qwen2.5-7b-shaped": (Qwen2Config, dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                                            num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0,
                                            max_position_embeddings=32768)),
}
QUICK_SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=512)


# An expert (drafter) for a random-weight target: the target's family and vocabulary, a small body.
EXPERT_SHAPE = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2)


def random_model(name: str, layers: int, device: str, dtype: str, quick: bool = False,
                 expert: bool = False) -> torch.nn.Module:
    """A random-weight model of one of ``SHAPES`` with ``layers`` layers (tiny in ``quick``; with ``expert``, a
    small body over the same vocabulary), made on the device."""
    cls, shape = SHAPES[name]
    shape = {**shape, **QUICK_SHAPE} if quick else {**shape, **EXPERT_SHAPE} if expert else dict(shape)
    if expert and "head_dim" in shape:
        shape["head_dim"] = shape["hidden_size"] // shape["num_attention_heads"]
    if quick and "head_dim" in shape:
        shape["head_dim"] = shape["hidden_size"] // shape["num_attention_heads"]
    dev = resolve_device(device)
    torch.manual_seed(0)
    with dev:
        model = AutoModelForCausalLM.from_config(cls(num_hidden_layers=layers, **shape),
                                                 dtype=resolve_dtype(dtype, dev), attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    return model


Build = Callable[[], torch.nn.Module]


def _models(device: str, dtype: str, quick: bool, layers: int) -> list[tuple[str, Build, Build]]:
    """(name, target, expert) for every model checked: the zoo's target with its code drafter, and each of
    ``SHAPES`` with a 2-layer expert of its family."""
    target, expert = paths.target_dir(), paths.drafter_dir("code")
    out: list[tuple[str, Build, Build]] = [("zoo target", lambda: load_model(target, device, dtype),
                                            lambda: load_model(expert, device, dtype))]
    for name in SHAPES:
        out.append((f"{name} ({layers} layers)", lambda name=name: random_model(name, layers, device, dtype, quick),
                    lambda name=name: random_model(name, 2, device, dtype, quick, expert=True)))
    return out


def _prompts(vocab: int, avoid: int, lengths: list[int], rng: random.Random) -> list[list[int]]:
    """Random prompts that never hold ``avoid`` (the pad id, which ``generate`` would mask out)."""
    def draw() -> int:
        t = rng.randrange(vocab - 1)
        return t + 1 if t >= avoid else t
    return [[draw() for _ in range(n)] for n in lengths]


def decode_rates(model: torch.nn.Module, prompts: list[list[int]], n: int, repeats: int, sync) -> tuple[list, list]:
    """Target-only greedy decoding, the engine's loop against ``generate``, at each of ``BATCHES`` (the first
    ``batch`` prompts; ``generate`` left-pads), alternated ``repeats`` times after one untimed warm-up; returns
    the rows (median tokens/s) and the two batch-1 outputs of the first prompt."""
    vocab = int(model.config.vocab_size)
    model.generation_config.eos_token_id = vocab
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    engine = SpeculativeEngine(model, eos_id=None)
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    paths_ = {"engine": lambda ps: [s.output_ids for s in engine.generate(ps, params, drafter=None, speculative=False)],
              "hf": lambda ps: _hf_generate(model, ps, n, vocab, pad)}
    rows, first = [], {}
    for batch in BATCHES:
        rates: dict[str, list[float]] = {k: [] for k in paths_}
        for i in range(repeats + 1):
            for name, run in paths_.items():
                sync()
                start = time.perf_counter()
                outs = run(prompts[:batch])
                sync()
                if i:
                    rates[name].append(sum(len(o) for o in outs) / (time.perf_counter() - start))
                elif batch == 1:
                    first[name] = outs[0]
        eng, hf = statistics.median(rates["engine"]), statistics.median(rates["hf"])
        rows.append({"batch": batch, "engine_tokens_per_s": round(eng, 1), "hf_tokens_per_s": round(hf, 1),
                     "engine_vs_hf": round(eng / hf, 3)})
    return rows, [first["engine"], first["hf"]]


def verify_passes(model: torch.nn.Module, context: int, calls: int, cuda: bool, sync, rng: random.Random) -> dict:
    """One verify pass (``TargetVerifier.step``: forward, acceptance, commit) of a chain of ``Q`` slots at batch 1
    and ``context``, rolled back after each call: median ms per ``Q`` (interleaved, 3 warm-ups), and on CUDA the
    host syncs per pass (sync debug mode) and the device time per pass (profiler) at ``Q = PROFILED_Q``."""
    vocab = int(model.config.vocab_size)
    prompt = [rng.randrange(vocab) for _ in range(context)]
    draft = [rng.randrange(vocab) for _ in range(max(QS) - 1)]
    verifier = TargetVerifier(ModelRunner(model, "gpu-check"), None)
    seq = Sequence(prompt, SamplingParams(max_new_tokens=1 << 20, ignore_eos=True))
    verifier.admit([seq])

    def step(q: int) -> None:
        verifier.step({seq.seq_id: DraftTree.chain(draft[: q - 1])})

    def undo() -> None:
        seq.output_ids.clear()
        verifier.runner.truncate(seq.seq_id, context - 1)

    wall: dict[int, list[float]] = {q: [] for q in QS}
    for i in range(calls + 3):
        for q in QS:
            sync()
            start = time.perf_counter()
            step(q)
            sync()
            if i >= 3:
                wall[q].append(time.perf_counter() - start)
            undo()
    ms = {q: statistics.median(w) * 1000 for q, w in wall.items()}
    out = {"context": context, "ms": {str(q): round(v, 3) for q, v in ms.items()},
           "q9_over_q1": round(ms[9] / ms[1], 3), "syncs_per_pass": None, "kernel_ms_per_pass": None,
           "outside_kernels_share": None}
    if cuda:
        out.update(device_profile(lambda: step(PROFILED_Q), undo, ms[PROFILED_Q], sync))
    return out


def device_profile(step, undo, wall_ms: float, sync, passes: int = 5) -> dict:
    """Host syncs per pass (CUDA sync debug mode, its warnings counted) and device time per pass (profiler: self
    CUDA time of every device event) against ``wall_ms``, a pass's unprofiled wall time; errors are reported."""
    out: dict = {}
    try:
        syncs = 0
        for _ in range(passes):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    step()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            syncs += sum("synchroniz" in str(w.message) for w in caught)
            undo()
        out["syncs_per_pass"] = round(syncs / passes, 2)
    except Exception as exc:  # noqa: BLE001 - reported in the payload
        out["syncs_error"] = f"{type(exc).__name__}: {exc}"
    try:
        from torch.profiler import ProfilerActivity, profile

        sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(passes):
                step()
                undo()
            sync()
        device_us = sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
                        for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
        kernel_ms = device_us / 1000 / passes
        out.update(kernel_ms_per_pass=round(kernel_ms, 3), outside_kernels_share=round(1 - kernel_ms / wall_ms, 3))
    except Exception as exc:  # noqa: BLE001 - reported in the payload
        out["profile_error"] = f"{type(exc).__name__}: {exc}"
    return out


def first_divergence(a: list[int], b: list[int]) -> int | None:
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_model(model: torch.nn.Module, settings: dict, cuda: bool, seed: int = 0,
                expert: torch.nn.Module | None = None) -> dict:
    """Every measurement of one model (see the module's docstring); with an ``expert``, speculative decoding
    drafted by it is compared with HF ``generate`` too."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rng = random.Random(seed)
    plen = settings["prompt_tokens"]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    lengths = [plen] + [plen - rng.randrange(plen // 4) for _ in range(max(BATCHES) - 1)]
    prompts = _prompts(int(model.config.vocab_size), pad, lengths, rng)
    rows, (engine_out, hf_out) = decode_rates(model, prompts, settings["new_tokens"], settings["repeats"], sync)
    verify = verify_passes(model, settings["context"], settings["verify_calls"], cuda, sync, rng)
    div = first_divergence(engine_out, hf_out)
    spec_div = None
    if expert is not None:
        spec = SpeculativeEngine(model, {"expert": expert}, eos_id=None, config=SpecConfig(k=4))
        spec_out = spec.generate(prompts[:1], SamplingParams(max_new_tokens=settings["new_tokens"], ignore_eos=True),
                                 drafter="expert")[0].output_ids
        spec_div = first_divergence(spec_out, hf_out)
    return {"speculative_exact": spec_div is None if expert is not None else None,
            "speculative_first_divergence": spec_div,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "layers": int(model.config.num_hidden_layers), "hidden": int(model.config.hidden_size),
            "vocab": int(model.config.vocab_size), "decode": rows, "verify_pass": verify,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "exact": div is None, "first_divergence": div}


def run_gpu_check(device: str, dtype: str, out_dir, quick: bool = False, layers: int | None = None,
                  progress: bool = True) -> dict:
    """Check every model, write ``gpu-check.json`` and ``gpu-check.md`` into ``out_dir``; returns the payload."""
    cuda = resolve_device(device).type == "cuda"
    layers = layers or (2 if quick else 4)
    settings = {"prompt_tokens": 32 if quick else 64, "new_tokens": 12 if quick else 32,
                "context": 64 if quick else 256, "repeats": 1 if quick else 3, "verify_calls": 3 if quick else 20}
    results = []
    bar = tqdm(_models(device, dtype, quick, layers), desc="bench gpu", unit="model", disable=not progress)
    for name, build, build_expert in bar:
        bar.set_postfix_str(name)
        row: dict = {"model": name}
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = expert = None
        try:
            model, expert = build(), build_expert()
            row.update(check_model(model, settings, cuda, expert=expert))
        except Exception as exc:  # noqa: BLE001 - one model's failure is reported, the others still run
            log.exception("gpu check of %s failed", name)
            row["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            model = expert = None
        results.append(row)
        gc.collect()
    env = environment()
    env["device_name"] = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    payload = {"benchmark": "gpu", "environment": env,
               "config": {"device": device, "dtype": dtype, "quick": quick, "layers": layers, **settings,
                          "batches": list(BATCHES), "qs": list(QS), "profiled_q": PROFILED_Q},
               "results": results}
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.json").write_text(json.dumps(payload, indent=1))
    (out / "gpu-check.md").write_text(gpu_markdown(payload) + "\n")
    return payload


def _cell(x, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def gpu_markdown(payload: dict) -> str:
    header = ["model", "batch", "engine tok/s", "HF tok/s", "engine / HF", "Q9 / Q1", "syncs / pass",
              "outside kernels", "peak GiB", "exact", "speculative exact"]
    rows = []
    for r in payload["results"]:
        if "error" in r:
            rows.append([r["model"], "—", "—", "—", "—", "—", "—", "—", "—", f"error: {r['error'][:80]}", "—"])
            continue
        v = r["verify_pass"]
        exact = "yes" if r["exact"] else f"no (token {r['first_divergence']})"
        spec = ("yes" if r["speculative_exact"] else f"no (token {r['speculative_first_divergence']})"
                if r["speculative_exact"] is not None else "—")
        for d in r["decode"]:
            rows.append([r["model"], d["batch"], f"{d['engine_tokens_per_s']:.1f}", f"{d['hf_tokens_per_s']:.1f}",
                         f"{d['engine_vs_hf']:.2f}", _cell(v["q9_over_q1"]), _cell(v["syncs_per_pass"], "{:.1f}"),
                         _cell(v["outside_kernels_share"], "{:.0%}"), _cell(r["peak_gib"]), exact, spec])
    cfg, env = payload["config"], payload["environment"]
    note = (f"Greedy target-only decoding, {cfg['new_tokens']} new tokens after random prompts of about "
            f"{cfg['prompt_tokens']} tokens (medians of {cfg['repeats']} alternated runs; Hugging Face `generate` "
            f"left-padded at batch > 1). Q9 / Q1: a verify pass of 9 chain slots over one of 1, batch 1, context "
            f"{cfg['context']}; syncs and the share outside kernels at Q = {cfg['profiled_q']}; exact: the engine's "
            f"batch-1 output equals `generate`'s; speculative exact: so does speculative decoding drafted by a "
            f"2-layer expert of the family (the zoo's code drafter for its target). {env['device_name']}, "
            f"{cfg['device']}/{cfg['dtype']}, torch "
            f"{env['torch']}, transformers {env['transformers']}, git {env['git_sha']}, {env['time']}.")
    return table(header, rows) + "\n\n" + note
