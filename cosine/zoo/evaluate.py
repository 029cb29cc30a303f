"""``cosine zoo evaluate``: held-out perplexity, CPU step times and the acceptance-length matrix,
written into the manifest and the model card."""

from __future__ import annotations

import json
import logging
import math
import pathlib
import statistics
import time

import numpy as np
import torch

from cosine.engine.models import load_model, load_tokenizer
from cosine.engine.runner import ModelRunner, Segment
from cosine.engine.speculative import SpecConfig, SpeculativeEngine
from cosine.sampling_params import SamplingParams
from cosine.zoo import paths
from cosine.zoo.card import write_model_card
from cosine.zoo.train import heldout_loss

log = logging.getLogger(__name__)

# Acceptance matrix settings: greedy, chains of k=4, this many prompts per domain and new tokens each.
MATRIX_K = 4
MATRIX_PROMPTS = 40
MATRIX_NEW_TOKENS = 64
# Specialisation target: own-domain mean acceptance length at least this much above the next drafter.
SPECIALISATION_MARGIN = 0.15


def step_time_ms(model, batch: int, context: int = 128, repeats: int = 30) -> float:
    """Median wall time of one single-token decode step through the engine's runner."""
    runner = ModelRunner(model)
    ids = [f"r{i}" for i in range(batch)]
    gen = torch.Generator().manual_seed(0)
    vocab = runner.vocab_size
    prefix = torch.randint(0, vocab, (batch, context), generator=gen).tolist()
    runner.add_rows(ids, prefix)
    times = []
    for i in range(repeats + 3):
        segs = [Segment.chain([int((i * 7 + r) % vocab)]) for r in range(batch)]
        t = time.perf_counter()
        runner.forward(segs)
        runner.commit_segments(segs)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def step_times(models: dict, rounds: int = 3) -> dict[str, dict[str, float]]:
    """Median step times, measured in interleaved rounds so that drift hits every model alike."""
    samples: dict[str, dict[str, list[float]]] = {n: {"batch1": [], "batch8": []} for n in models}
    for _ in range(rounds):
        for name, model in models.items():
            for b in (1, 8):
                samples[name][f"batch{b}"].append(step_time_ms(model, b))
    return {n: {k: round(statistics.median(v), 3) for k, v in d.items()} for n, d in samples.items()}


def acceptance_matrix(engine: SpeculativeEngine, prompts: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Mean acceptance length of every drafter on every domain's held-out prompts (greedy, k=4 chains)."""
    matrix: dict[str, dict[str, float]] = {}
    params = SamplingParams(max_new_tokens=MATRIX_NEW_TOKENS, ignore_eos=True)
    for name in sorted(engine.drafters):
        matrix[name] = {}
        for domain, texts in sorted(prompts.items()):
            seqs = engine.generate(texts[:MATRIX_PROMPTS], params, drafter=name)
            drafts = sum(s.stats.drafts for s in seqs)
            accepted = sum(s.stats.accepted for s in seqs)
            matrix[name][domain] = round(1 + accepted / max(drafts, 1), 3)
            log.info("acceptance %s on %s: %.3f", name, domain, matrix[name][domain])
    return matrix


def specialisation(matrix: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Per domain: the best drafter, its margin over the next one, and whether the domain's own drafter wins."""
    out = {}
    domains = sorted({d for row in matrix.values() for d in row})
    for domain in domains:
        ranked = sorted(matrix, key=lambda n: matrix[n][domain], reverse=True)
        own = matrix.get(domain, {}).get(domain)
        runner_up = max((matrix[n][domain] for n in matrix if n != domain), default=float("nan"))
        margin = own / runner_up - 1 if own is not None and runner_up > 0 else float("nan")
        out[domain] = {
            "best": ranked[0],
            "own": own,
            "next_best": runner_up,
            "margin": round(margin, 4),
            "meets_target": ranked[0] == domain and margin >= SPECIALISATION_MARGIN,
        }
    return out


def evaluate_zoo(zoo: str | pathlib.Path | None = None, threads: int = 1) -> dict:
    root = paths.zoo_dir(zoo)
    manifest = paths.load_manifest(root)
    tokenizer = load_tokenizer(paths.target_dir(root))
    domains = sorted(manifest["corpora"])
    heldout_ids = {
        d: np.asarray(tokenizer(paths.heldout_text(d, root), add_special_tokens=False)["input_ids"], dtype=np.int64)
        for d in domains
    }
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        models = {"target": load_model(paths.target_dir(root), "cpu", "float32")}
        for name in manifest["drafters"]:
            models[name] = load_model(paths.drafter_dir(name, root), "cpu", "float32")
        perplexity = {
            name: {d: round(math.exp(heldout_loss(m, heldout_ids[d])), 3) for d in domains} for name, m in models.items()
        }
        steps = step_times(models)
        engine = SpeculativeEngine(
            models["target"],
            {n: models[n] for n in manifest["drafters"]},
            tokenizer.eos_token_id,
            SpecConfig(k=MATRIX_K),
            tokenizer,
        )
        matrix = acceptance_matrix(engine, paths.load_prompts(root))
    finally:
        torch.set_num_threads(previous_threads)
    target_step = steps["target"]["batch1"]
    manifest["evaluation"] = {
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch_threads": threads,
        "heldout_perplexity": perplexity,
        "step_ms": steps,
        "drafter_to_target_step_ratio": {
            n: round(steps[n]["batch1"] / target_step, 3) for n in manifest["drafters"]
        },
        "drafter_to_target_step_ratio_batch8": {
            n: round(steps[n]["batch8"] / steps["target"]["batch8"], 3) for n in manifest["drafters"]
        },
        "acceptance_matrix": {
            "k": MATRIX_K,
            "prompts_per_domain": MATRIX_PROMPTS,
            "new_tokens": MATRIX_NEW_TOKENS,
            "mean_acceptance_length": matrix,
            "specialisation": specialisation(matrix),
        },
    }
    paths.manifest_path(root).write_text(json.dumps(manifest, indent=1))
    write_model_card(root, manifest)
    return manifest
