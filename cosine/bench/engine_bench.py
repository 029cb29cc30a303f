"""``cosine bench engine``: the single-process paths on the zoo, in one run, on the same cores.

Compared: target-only decoding (Hugging Face ``generate`` and the engine's own loop), Hugging Face
assisted generation (``assistant_model=``, batch 1), and the engine's coupled speculative path (chains
and trees, batch 1 and 8). Every path decodes the same mixed-domain held-out prompts greedily to the same
length cap; each run's outputs are checked against the engine's target-only outputs.
"""

from __future__ import annotations

import logging
import pathlib
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from cosine.bench.report import environment
from cosine.engine.sequence import SpecStats
from cosine.engine.speculative import SpecConfig, SpeculativeEngine
from cosine.markdown import table
from cosine.sampling_params import SamplingParams
from cosine.zoo import paths

log = logging.getLogger(__name__)


@dataclass
class EngineBenchConfig:
    zoo: str | None = None
    prompts_per_domain: int = 8
    max_new_tokens: int = 64
    k: int = 4
    tree_width: int = 2
    batch_sizes: tuple[int, ...] = (1, 8)
    threads: int = 2
    device: str = "cpu"
    dtype: str = "auto"
    hf_baselines: bool = True


@dataclass
class RunResult:
    name: str
    batch: int
    tokens: int
    seconds: float
    target_forwards: int
    stats: dict | None = None
    identical: int | None = None  # outputs identical to target-only
    compared: int | None = None
    draft_share: float | None = None  # share of wall time spent drafting (engine speculative runs)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class _ForwardCounter:
    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        self._handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()


def _prompts(zoo: pathlib.Path, per_domain: int) -> list[str]:
    by_domain = paths.load_prompts(zoo)
    mixed = []
    for i in range(per_domain):
        for domain in sorted(by_domain):
            if i < len(by_domain[domain]):
                mixed.append(by_domain[domain][i])
    return mixed


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def run_engine_bench(cfg: EngineBenchConfig, progress: bool = True) -> dict:
    torch.set_num_threads(cfg.threads)
    zoo = paths.zoo_dir(cfg.zoo)
    engine = SpeculativeEngine.from_zoo(zoo, device=cfg.device, dtype=cfg.dtype)
    tok = engine.tokenizer
    target = engine.verifier.runner.model
    texts = _prompts(zoo, cfg.prompts_per_domain)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    drafter_of = engine.choose_drafters(ids)
    # Natural stopping (end-of-text or the length cap) on every path, so outputs are comparable token for token.
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens)
    device = engine.verifier.runner.device
    n = cfg.max_new_tokens

    plan: list[tuple[str, int]] = []
    if cfg.hf_baselines:
        plan += [("HF generate (target only)", 1), ("HF assisted generation", 1)]
    for b in cfg.batch_sizes:
        plan.append(("engine target-only", b))
    for b in cfg.batch_sizes:
        plan += [(f"engine chain k={cfg.k}", b), (f"engine tree k={cfg.k} w={cfg.tree_width}", b)]

    # Warm up every code path once (allocator, kernels) before timing anything.
    engine.config = SpecConfig(k=cfg.k, tree_width=cfg.tree_width)
    engine.generate(ids[:2], SamplingParams(max_new_tokens=8, ignore_eos=True), drafter=drafter_of[:2])
    engine.generate(ids[:2], SamplingParams(max_new_tokens=8, ignore_eos=True), speculative=False)

    reference: list[list[int]] = []
    results: list[RunResult] = []
    outputs_of: list[list[list[int]]] = []
    bar = tqdm(plan, desc="bench engine", disable=not progress, unit="run")
    for name, batch in bar:
        bar.set_postfix_str(f"{name} b={batch}")
        counter = _ForwardCounter(target)
        start = time.perf_counter()
        outputs: list[list[int]] = []
        stats = SpecStats()
        draft_s = 0.0
        if name.startswith("HF"):
            for i, p in enumerate(ids):
                kwargs = {}
                if "assisted" in name:
                    kwargs["assistant_model"] = engine.drafters[drafter_of[i]].runner.model
                out = target.generate(
                    torch.tensor([p], device=device),
                    max_new_tokens=n,
                    do_sample=False,
                    **kwargs,
                )
                outputs.append(out[0, len(p) :].tolist())
        else:
            speculative = not name.startswith("engine target-only")
            width = cfg.tree_width if "tree" in name else 1
            engine.config = SpecConfig(k=cfg.k, tree_width=width)
            engine.timings.draft_s = 0.0
            for part, names in zip(_chunks(ids, batch), _chunks(drafter_of, batch)):
                seqs = engine.generate(part, params, drafter=names, speculative=speculative)
                for s in seqs:
                    outputs.append(s.output_ids)
                    stats.merge(s.stats)
            draft_s = engine.timings.draft_s
        seconds = time.perf_counter() - start
        counter.close()
        res = RunResult(name, batch, sum(len(o) for o in outputs), seconds, counter.calls)
        if name == "engine target-only" and not reference:
            reference = outputs
        if stats.drafts:
            res.stats = stats.as_dict()
            res.draft_share = round(draft_s / seconds, 3)
        results.append(res)
        outputs_of.append(outputs)
    for res, outs in zip(results, outputs_of):
        if reference and res.name != "engine target-only":
            res.compared = len(reference)
            res.identical = sum(a == b for a, b in zip(outs, reference))
    baseline = next((r for r in results if r.name == "engine target-only" and r.batch == 1), results[0])
    rows = []
    for r in results:
        mal = r.stats["mean_acceptance_length"] if r.stats else None
        rate = r.stats["acceptance_rate"] if r.stats else None
        rows.append(
            {
                "path": r.name,
                "batch": r.batch,
                "tokens": r.tokens,
                "seconds": round(r.seconds, 3),
                "tokens_per_s": round(r.tokens_per_s, 2),
                "speedup_vs_target_only_b1": round(r.tokens_per_s / baseline.tokens_per_s, 3),
                "tokens_per_target_forward": round(r.tokens / max(r.target_forwards, 1), 3),
                "mean_acceptance_length": mal,
                "acceptance_rate": rate,
                "draft_share_of_time": r.draft_share,
                "identical_to_target_only": f"{r.identical}/{r.compared}" if r.compared else None,
                "spec_stats": r.stats,
            }
        )
    return {
        "benchmark": "engine",
        "environment": environment(),
        "config": {**asdict(cfg), "prompts": len(ids), "zoo": str(zoo)},
        "drafter_assignment": {d: drafter_of.count(d) for d in sorted(set(drafter_of))},
        "results": rows,
    }


def engine_markdown(payload: dict) -> str:
    env = payload["environment"]
    cfg = payload["config"]
    header = [
        "path",
        "batch",
        "tokens/s",
        "× target-only b=1",
        "tokens / target forward",
        "mean acceptance length",
        "acceptance rate",
        "same output as target-only",
    ]
    rows = [
        [
            r["path"],
            r["batch"],
            f"{r['tokens_per_s']:.1f}",
            f"{r['speedup_vs_target_only_b1']:.2f}",
            f"{r['tokens_per_target_forward']:.2f}",
            "—" if r["mean_acceptance_length"] is None else f"{r['mean_acceptance_length']:.2f}",
            "—" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}",
            r["identical_to_target_only"] or "—",
        ]
        for r in payload["results"]
    ]
    note = (
        f"{cfg['prompts']} held-out prompts (mixed domains), greedy, {cfg['max_new_tokens']} new tokens each; "
        f"{env['cpu']} ({env['cpu_count']} cores), torch {env['torch']} with {cfg['threads']} threads, "
        f"{cfg['device']}/{cfg['dtype']}; git {env['git_sha']}, {env['time']}."
    )
    return table(header, rows) + "\n\n" + note
