"""``cosine zoo build``: corpora -> tokenizer -> target -> domain drafters -> evaluation and model card.

Everything is deterministic given the Python installation (its standard library is the corpus) and the
settings below; the manifest records corpus hashes, settings, loss curves and timings.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import shutil
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import transformers

from cosine.zoo import paths
from cosine.zoo.corpora import DOMAINS, Corpus, build_corpora
from cosine.zoo.tokenizer import save_tokenizer, train_tokenizer
from cosine.zoo.train import ModelSpec, TrainPlan, WindowSampler, heldout_loss, new_model, train

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1


@dataclass
class ZooSettings:
    """Every knob of the zoo build, recorded in the manifest."""

    vocab_size: int = 4096
    corpus_chars: int = 4_000_000  # training characters per domain (cap)
    tokenizer_chars: int = 2_000_000  # characters per domain the tokenizer is trained on
    target: ModelSpec = field(default_factory=lambda: ModelSpec(hidden=384, layers=8, heads=6, intermediate=1024))
    drafter: ModelSpec = field(default_factory=lambda: ModelSpec(hidden=160, layers=2, heads=4, intermediate=432))
    target_tokens: int = 2_300_000
    drafter_tokens: int = 2_000_000
    drafter_distill_fraction: float = 0.35
    time_budget_min: float = 90.0
    # Shares of the time budget; what is left is for corpora, tokenizer and evaluation.
    target_share: float = 0.55
    drafter_share: float = 0.09  # each
    prompts_per_domain: int = 40
    heldout_chars: int = 60_000
    seed: int = 0

    def scaled(self, factor: float) -> ZooSettings:
        """A smaller build (for smoke tests): token counts and corpus sizes times ``factor``."""
        return ZooSettings(
            **{
                **asdict(self),
                "target": self.target,
                "drafter": self.drafter,
                "corpus_chars": int(self.corpus_chars * factor),
                "tokenizer_chars": int(self.tokenizer_chars * factor),
                "target_tokens": int(self.target_tokens * factor),
                "drafter_tokens": int(self.drafter_tokens * factor),
            }
        )


def _encode(tokenizer, docs: list[str], eos_id: int) -> np.ndarray:
    out: list[int] = []
    for doc in docs:
        out.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        out.append(eos_id)
    return np.asarray(out, dtype=np.uint16)


def make_prompts(corpus: Corpus, count: int, seed: int) -> list[str]:
    """Held-out prompts of varied length (about 80 to 640 characters), cut at line boundaries."""
    rng = random.Random(f"{seed}:{corpus.domain}")
    lengths = (80, 160, 320, 640)
    prompts: list[str] = []
    docs = [d for d in corpus.test if len(d) > 200]
    attempts = 0
    while len(prompts) < count and attempts < count * 100:
        attempts += 1
        lines = rng.choice(docs).splitlines(keepends=True)
        start = rng.randrange(len(lines))
        want = lengths[len(prompts) % len(lengths)]
        text = ""
        for line in lines[start:]:
            if len(line) > want or (text and len(text) + len(line) > want):
                break
            text += line
        text = text.strip("\n")
        if 40 <= len(text) <= want and text.strip() and text + "\n" not in prompts:
            prompts.append(text + "\n")
    return prompts


def write_prompts(zoo, corpora: dict[str, Corpus], settings: ZooSettings) -> dict[str, list[str]]:
    prompts = {d: make_prompts(corpora[d], settings.prompts_per_domain, settings.seed) for d in DOMAINS}
    (zoo / "prompts.json").write_text(json.dumps(prompts, indent=1, ensure_ascii=False))
    return prompts


def _save_model(model, tokenizer, folder) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    model.to(torch.float16).save_pretrained(str(folder), safe_serialization=True)
    model.to(torch.float32)
    save_tokenizer(tokenizer, folder)


def build_zoo(out: str | None = None, settings: ZooSettings | None = None, evaluate: bool = True) -> dict:
    """Build the whole zoo into ``out`` (default: the zoo folder) and return its manifest."""
    settings = settings or ZooSettings()
    zoo = paths.zoo_dir(out)
    zoo.mkdir(parents=True, exist_ok=True)
    budget_s = settings.time_budget_min * 60
    started = time.perf_counter()
    torch.manual_seed(settings.seed)

    log.info("building corpora from the standard library of Python %s", platform.python_version())
    corpora = build_corpora(settings.corpus_chars)

    log.info("training the tokenizer (vocabulary %d)", settings.vocab_size)
    tok_docs: list[str] = []
    for corpus in corpora.values():
        used = 0
        for doc in corpus.train:
            if used >= settings.tokenizer_chars:
                break
            tok_docs.append(doc)
            used += len(doc)
    tokenizer = train_tokenizer(tok_docs, settings.vocab_size)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id

    train_ids = {d: _encode(tokenizer, corpora[d].train, eos_id) for d in DOMAINS}
    test_ids = {d: _encode(tokenizer, corpora[d].test, eos_id) for d in DOMAINS}
    heldout_dir = zoo / "heldout"
    heldout_dir.mkdir(exist_ok=True)
    for d in DOMAINS:
        text = "\n\n".join(corpora[d].test)[: settings.heldout_chars]
        (heldout_dir / f"{d}.txt").write_text(text, encoding="utf-8")
    write_prompts(zoo, corpora, settings)

    manifest: dict = {
        "version": MANIFEST_VERSION,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "settings": asdict(settings),
        "tokenizer": {"vocab_size": len(tokenizer), "eos_id": eos_id, "pad_id": pad_id},
        "corpora": {
            d: {
                "train_sha256": corpora[d].sha256("train"),
                "test_sha256": corpora[d].sha256("test"),
                "train_docs": len(corpora[d].train),
                "test_docs": len(corpora[d].test),
                "train_chars": corpora[d].chars("train"),
                "test_chars": corpora[d].chars("test"),
                "train_tokens": int(len(train_ids[d])),
                "test_tokens": int(len(test_ids[d])),
            }
            for d in DOMAINS
        },
        "drafters": {},
    }

    vocab = len(tokenizer)
    # Target: all domains, equal weight.
    target = new_model(settings.target, vocab, eos_id, pad_id, settings.seed)
    plan = TrainPlan(
        tokens=settings.target_tokens, seed=settings.seed, time_budget_s=budget_s * settings.target_share
    )
    sampler = WindowSampler(train_ids, {d: 1.0 for d in DOMAINS}, settings.seed)
    report = train(target, sampler, plan, desc="target")
    manifest["target"] = {
        "path": "target",
        "spec": asdict(settings.target),
        "parameters": sum(p.numel() for p in target.parameters()),
        "train": report.as_dict(),
        "heldout_loss": {d: round(heldout_loss(target, test_ids[d]), 4) for d in DOMAINS},
    }
    _save_model(target, tokenizer, paths.target_dir(zoo))
    # Reload the saved (fp16-rounded) target as the teacher: drafters learn the model users will run.
    teacher = transformers.AutoModelForCausalLM.from_pretrained(str(paths.target_dir(zoo)), dtype=torch.float32)

    for i, d in enumerate(DOMAINS):
        drafter = new_model(settings.drafter, vocab, eos_id, pad_id, settings.seed + 1 + i)
        plan = TrainPlan(
            tokens=settings.drafter_tokens,
            seed=settings.seed + 1 + i,
            lr=3e-3,
            time_budget_s=budget_s * settings.drafter_share,
            distill_fraction=settings.drafter_distill_fraction,
        )
        sampler = WindowSampler({d: train_ids[d]}, {d: 1.0}, settings.seed + 1 + i)
        report = train(drafter, sampler, plan, desc=f"drafter:{d}", teacher=teacher)
        manifest["drafters"][d] = {
            "path": f"drafters/{d}",
            "domain": d,
            "spec": asdict(settings.drafter),
            "parameters": sum(p.numel() for p in drafter.parameters()),
            "train": report.as_dict(),
            "heldout_loss": {x: round(heldout_loss(drafter, test_ids[x]), 4) for x in DOMAINS},
        }
        _save_model(drafter, tokenizer, paths.drafter_dir(d, zoo))

    manifest["build_seconds"] = round(time.perf_counter() - started, 1)
    paths.manifest_path(zoo).write_text(json.dumps(manifest, indent=1))
    log.info("zoo trained in %.0f s", manifest["build_seconds"])
    if evaluate:
        from cosine.zoo.evaluate import evaluate_zoo

        manifest = evaluate_zoo(zoo)
    return manifest
