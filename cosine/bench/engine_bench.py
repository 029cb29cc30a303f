"""``cosine bench engine``: the single-process paths on the zoo, in one run, on the same cores.

Compared: target-only decoding (Hugging Face ``generate``, batch 1 and left-padded batches, and the
engine's own loop), Hugging Face assisted generation (``assistant_model=``, batch 1), and the engine's
coupled speculative path (chains and trees, batch 1 and 8). Every path decodes the same mixed-domain
held-out prompts greedily to the same length cap; each run's outputs are checked against the engine's
target-only outputs. The paths take turns chunk by chunk (a chunk = the largest batch's prompts) and the
whole run repeats ``repeats`` times, so a slow spell of a shared machine hits every path alike; rates
and ratios are medians over the repeats.

A second table times one verify pass of the engine (a draft chain or tree of ``Q`` slots, accepted,
committed) against Hugging Face's one-token decode step (a forward with a ``DynamicCache``, as
``generate`` makes it) at the same context, the two interleaved call by call.
"""

from __future__ import annotations

import logging
import pathlib
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from cosine.bench.report import environment
from cosine.engine.kv_cache import cache_kwarg
from cosine.engine.runner import ModelRunner
from cosine.engine.sequence import Sequence, SpecStats
from cosine.engine.speculative import SpecConfig, SpeculativeEngine
from cosine.engine.target import TargetVerifier
from cosine.engine.tree import DraftTree
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
    repeats: int = 1
    # Verify-pass micro-benchmark: contexts, and calls per variant (0 = skip it).
    micro_contexts: tuple[int, ...] = (64, 300)
    micro_calls: int = 40

HF_GENERATE = "HF generate (target only)"
TARGET_ONLY = "engine target-only"
# Targets of the engine's speed, as ratios within one run.
TARGETS = {"verify_pass_vs_hf_step_max": 1.2, "target_only_vs_hf": 0.95, "chain_b1_vs_hf": 1.6}


@dataclass
class RunResult:
    """One path's runs: a cell per (repeat, chunk of prompts), all paths running each cell in turn."""

    name: str
    batch: int
    tokens: list[int] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)  # seconds per cell
    cpu: list[float] = field(default_factory=list)  # this process's CPU seconds per cell
    target_forwards: int = 0  # first repeat
    first_tokens: int = 0  # first repeat
    draft_s: float = 0.0
    stats: dict | None = None
    identical: int | None = None  # outputs identical to target-only
    compared: int | None = None

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens) / sum(self.wall) if self.wall else 0.0

    @property
    def tokens_per_cpu_s(self) -> float:
        return sum(self.tokens) / sum(self.cpu) if self.cpu else 0.0


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


def _hf_generate(target: torch.nn.Module, prompts: list[list[int]], n: int, eos: int | None, pad: int,
                 assistant: torch.nn.Module | None = None) -> list[list[int]]:
    """One ``generate`` call (left-padded when several prompts); each row's new tokens up to end-of-text."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=target.device)
    kwargs: dict = {"assistant_model": assistant} if assistant is not None else {}
    if len(prompts) > 1:
        kwargs["attention_mask"] = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                                                device=target.device)
    with torch.inference_mode():
        out = target.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=pad, **kwargs)
    rows = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t == eos), len(row))
        rows.append(row[:end])
    return rows


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
    n = cfg.max_new_tokens
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    plan: list[tuple[str, int]] = []
    if cfg.hf_baselines:
        plan += [(HF_GENERATE, b) for b in cfg.batch_sizes] + [("HF assisted generation", 1)]
    for b in cfg.batch_sizes:
        plan.append((TARGET_ONLY, b))
    for b in cfg.batch_sizes:
        plan += [(f"engine chain k={cfg.k}", b), (f"engine tree k={cfg.k} w={cfg.tree_width}", b)]

    def run(name: str, batch: int, idx: list[int], res: RunResult, stats: SpecStats) -> list[list[int]]:
        outputs: list[list[int]] = []
        if name.startswith("HF"):
            for part in _chunks(idx, batch):
                assistant = engine.drafters[drafter_of[part[0]]].runner.model if "assisted" in name else None
                outputs += _hf_generate(target, [ids[i] for i in part], n, tok.eos_token_id, pad, assistant)
            return outputs
        speculative = name != TARGET_ONLY
        engine.config = SpecConfig(k=cfg.k, tree_width=cfg.tree_width if "tree" in name else 1)
        before = engine.timings.draft_s
        for part in _chunks(idx, batch):
            seqs = engine.generate([ids[i] for i in part], params, drafter=[drafter_of[i] for i in part],
                                   speculative=speculative)
            for s in seqs:
                outputs.append(s.output_ids)
                stats.merge(s.stats)
        res.draft_s += engine.timings.draft_s - before
        return outputs

    # Warm up every code path once (allocator, kernels) before timing anything.
    for name, batch in plan:
        run(name, batch, list(range(min(2, len(ids)))), RunResult(name, batch), SpecStats())

    results = [RunResult(name, b) for name, b in plan]
    outputs_of: list[list[list[int]]] = [[] for _ in plan]
    stats_of = [SpecStats() for _ in plan]
    chunk = max(cfg.batch_sizes)
    cells = [(r, part) for r in range(cfg.repeats) for part in _chunks(list(range(len(ids))), chunk)]
    bar = tqdm(cells, desc="bench engine", disable=not progress, unit="chunk")
    for repeat, part in bar:
        for res, outputs, stats in zip(results, outputs_of, stats_of):
            counter = _ForwardCounter(target)
            start, cpu = time.perf_counter(), time.process_time()
            outs = run(res.name, res.batch, part, res, stats if repeat == 0 else SpecStats())
            res.wall.append(time.perf_counter() - start)
            res.cpu.append(time.process_time() - cpu)
            counter.close()
            res.tokens.append(sum(len(o) for o in outs))
            if repeat == 0:
                res.target_forwards += counter.calls
                res.first_tokens += res.tokens[-1]
                outputs.extend(outs)
    reference = next((o for r, o in zip(results, outputs_of) if r.name == TARGET_ONLY), [])
    for res, outs, stats in zip(results, outputs_of, stats_of):
        if reference and res.name != TARGET_ONLY:
            res.compared = len(reference)
            res.identical = sum(a == b for a, b in zip(outs, reference))
        if stats.drafts:
            res.stats = stats.as_dict()
    rows = [_row(r, results) for r in results]
    micro = verify_micro(engine, cfg.micro_contexts, cfg.micro_calls) if cfg.micro_calls > 0 else []
    return {
        "benchmark": "engine",
        "environment": environment(),
        "config": {**asdict(cfg), "prompts": len(ids), "zoo": str(zoo)},
        "drafter_assignment": {d: drafter_of.count(d) for d in sorted(set(drafter_of))},
        "results": rows,
        "verify_pass": micro,
        "targets": _targets(rows, micro),
    }


def _variants(vocab: int, rng: random.Random) -> dict[str, DraftTree]:
    """The drafts of the verify-pass micro-benchmark, by name (slots = draft nodes + the fed token)."""
    def chain(k: int) -> DraftTree:
        return DraftTree.chain([rng.randrange(vocab) for _ in range(k)])
    tree = DraftTree()
    parent = -1
    for _ in range(4):  # k=4, width 2: a spine node and one alternative per depth, 9 slots
        node = tree.add(rng.randrange(vocab), parent)
        tree.add(rng.randrange(vocab), parent)
        parent = node
    return {"plain step (Q=1)": chain(0), "chain Q=5": chain(4), "chain Q=9": chain(8), "tree Q=9 (k=4 w=2)": tree}


def verify_micro(engine: SpeculativeEngine, contexts: tuple[int, ...], calls: int, seed: int = 0) -> list[dict]:
    """Median time of one verify pass (``TargetVerifier.step``: forward, acceptance, commit) per draft shape,
    against Hugging Face's one-token step (a forward of one token with a ``DynamicCache``), at each context,
    the calls interleaved. Each call is rolled back afterwards (untimed), so the context stays put."""
    target = engine.verifier.runner.model
    rng = random.Random(seed)
    rows = []
    for ctx in contexts:
        wall, cpu = _micro_context(target, ctx, calls, rng)
        base_wall, base_cpu = statistics.median(wall["HF one-token step"]), statistics.median(cpu["HF one-token step"])
        for name in wall:
            rows.append({"context": ctx, "pass": name, "ms": round(statistics.median(wall[name]) * 1000, 3),
                         "vs_hf_step": round(statistics.median(wall[name]) / base_wall, 3),
                         "vs_hf_step_cpu_time": round(statistics.median(cpu[name]) / base_cpu, 3)})
    return rows


def _micro_context(target: torch.nn.Module, ctx: int, calls: int, rng: random.Random):
    """Wall and CPU seconds per call of each pass at one context (the first 3 calls warm up, untimed)."""
    vocab = int(target.config.vocab_size)
    key = cache_kwarg(target)
    prompt = [rng.randrange(vocab) for _ in range(ctx)]
    cache = DynamicCache(config=target.config)
    with torch.inference_mode():
        target(input_ids=torch.tensor([prompt], device=target.device), use_cache=True, **{key: cache})

    def hf_forward(q: int) -> None:
        with torch.inference_mode():
            target(input_ids=torch.tensor([prompt[-q:]], device=target.device), use_cache=True, **{key: cache})

    verifier = TargetVerifier(ModelRunner(target, "micro"), None)
    seq = Sequence(list(prompt), SamplingParams(max_new_tokens=1 << 20, ignore_eos=True))
    verifier.admit([seq])

    def undo() -> None:
        seq.output_ids.clear()
        verifier.runner.truncate(seq.seq_id, ctx - 1)

    # HF's forward of Q tokens too: the floor a verify pass of Q slots can reach with this model.
    steps = {"HF one-token step": (lambda: hf_forward(1), lambda: cache.crop(-1))}
    for q in (5, 9):
        steps[f"HF forward of {q} tokens"] = (lambda q=q: hf_forward(q), lambda q=q: cache.crop(-q))
    for name, tree in _variants(vocab, rng).items():
        steps[name] = (lambda tree=tree: verifier.step({seq.seq_id: tree}), undo)
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(calls + 3):
        for name, (step, back) in steps.items():
            t, c = time.perf_counter(), time.process_time()
            step()
            dt, dc = time.perf_counter() - t, time.process_time() - c
            back()
            if i >= 3:
                wall[name].append(dt)
                cpu[name].append(dc)
    return wall, cpu


def _targets(rows: list[dict], micro: list[dict]) -> dict:
    """The engine's speed targets (``TARGETS``): each ratio measured (wall clock and CPU time), its bound, and
    whether each meets it."""
    out: dict[str, dict] = {}
    passes = [m for m in micro if not m["pass"].startswith("HF")]
    if passes:
        out["verify_pass_vs_hf_step_max"] = {"wall": max(m["vs_hf_step"] for m in passes),
                                             "cpu": max(m["vs_hf_step_cpu_time"] for m in passes),
                                             "at_most": TARGETS["verify_pass_vs_hf_step_max"]}
    for r in rows:
        if r["path"] == TARGET_ONLY and r["vs_hf_generate_same_batch"] is not None:
            out[f"target_only_b{r['batch']}_vs_hf"] = {"wall": r["vs_hf_generate_same_batch"],
                                                     "cpu": r["vs_hf_generate_same_batch_cpu_time"],
                                                     "at_least": TARGETS["target_only_vs_hf"]}
        if r["path"].startswith("engine chain") and r["batch"] == 1 and r["vs_hf_generate_b1"] is not None:
            out["chain_b1_vs_hf"] = {"wall": r["vs_hf_generate_b1"], "cpu": r["vs_hf_generate_b1_cpu_time"],
                                     "at_least": TARGETS["chain_b1_vs_hf"]}
    for t in out.values():
        for clock in ("wall", "cpu"):
            t[f"met_{clock}"] = t[clock] <= t["at_most"] if "at_most" in t else t[clock] >= t["at_least"]
    return out


def _ratio(res: RunResult, base: RunResult | None, cpu: bool = False) -> float | None:
    """Median over cells (repeat x chunk, which every path ran back to back) of ``res``'s rate over ``base``'s:
    a slow spell of a shared machine falls on one cell of both, not on one path."""
    if base is None or len(base.wall) != len(res.wall):
        return None
    mine, theirs = (res.cpu, base.cpu) if cpu else (res.wall, base.wall)
    ratios = [(t / max(s, 1e-9)) / (bt / max(bs, 1e-9)) for t, s, bt, bs in zip(res.tokens, mine, base.tokens, theirs)]
    return round(statistics.median(ratios), 3)


def _row(r: RunResult, results: list[RunResult]) -> dict:
    find = {(x.name, x.batch): x for x in results}
    hf_b1, hf_same = find.get((HF_GENERATE, 1)), find.get((HF_GENERATE, r.batch))
    return {
        "path": r.name,
        "batch": r.batch,
        "tokens": r.first_tokens,
        "seconds": [round(x, 3) for x in r.wall],
        "cpu_seconds": [round(x, 3) for x in r.cpu],
        "tokens_per_s": round(r.tokens_per_s, 2),
        "tokens_per_cpu_s": round(r.tokens_per_cpu_s, 2),
        "speedup_vs_target_only_b1": _ratio(r, find.get((TARGET_ONLY, 1))),
        "vs_hf_generate_b1": _ratio(r, hf_b1),
        "vs_hf_generate_b1_cpu_time": _ratio(r, hf_b1, cpu=True),
        "vs_hf_generate_same_batch": _ratio(r, hf_same),
        "vs_hf_generate_same_batch_cpu_time": _ratio(r, hf_same, cpu=True),
        "tokens_per_target_forward": round(r.first_tokens / max(r.target_forwards, 1), 3),
        "mean_acceptance_length": r.stats["mean_acceptance_length"] if r.stats else None,
        "acceptance_rate": r.stats["acceptance_rate"] if r.stats else None,
        "draft_share_of_time": round(r.draft_s / sum(r.wall), 3) if r.stats else None,
        "identical_to_target_only": f"{r.identical}/{r.compared}" if r.compared else None,
        "spec_stats": r.stats,
    }


def _cell(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def engine_markdown(payload: dict) -> str:
    env = payload["environment"]
    cfg = payload["config"]
    header = ["path", "batch", "tokens/s", "× HF generate, same batch", "(CPU time)", "× target-only b=1",
              "tokens / target forward", "mean acceptance length", "acceptance rate", "same output as target-only"]
    rows = [
        [r["path"], r["batch"], f"{r['tokens_per_s']:.1f}", _cell(r["vs_hf_generate_same_batch"]),
         _cell(r["vs_hf_generate_same_batch_cpu_time"]), _cell(r["speedup_vs_target_only_b1"]),
         f"{r['tokens_per_target_forward']:.2f}", _cell(r["mean_acceptance_length"]), _cell(r["acceptance_rate"]),
         r["identical_to_target_only"] or "—"]
        for r in payload["results"]
    ]
    note = (
        f"{cfg['prompts']} held-out prompts (mixed domains), greedy, {cfg['max_new_tokens']} new tokens each; "
        f"{cfg['repeats']} repeat(s), every path running each chunk of {max(cfg['batch_sizes'])} prompts in turn; "
        "ratios are medians over those cells, by the wall clock and by this process's CPU time (the robust one "
        f"on a shared machine); {env['cpu']} ({env['cpu_count']} cores), torch {env['torch']} with "
        f"{cfg['threads']} threads, {cfg['device']}/{cfg['dtype']}; git {env['git_sha']}, {env['time']}."
    )
    out = table(header, rows) + "\n\n" + note
    micro = payload.get("verify_pass") or []
    if micro:
        out += "\n\n" + table(
            ["context", "pass", "ms (median)", "× HF one-token step", "(CPU time)"],
            [[m["context"], m["pass"], f"{m['ms']:.2f}", f"{m['vs_hf_step']:.2f}", f"{m['vs_hf_step_cpu_time']:.2f}"]
             for m in micro])
        out += (f"\n\nOne verify pass of the engine (forward, acceptance, commit) against Hugging Face's one-token "
                "decode step (a forward with a `DynamicCache`) at the same context, and HF's own forward of 5 and 9 "
                f"tokens beside it; medians of {cfg['micro_calls']} interleaved calls each.")
    targets = payload.get("targets") or {}
    if targets:
        def met(t: dict, clock: str) -> str:
            return f"{t[clock]:.2f}" + ("" if t[f"met_{clock}"] else " (**missed**)")

        out += "\n\n" + table(
            ["target", "bound", "wall clock", "CPU time"],
            [[name, ("≤ " if "at_most" in t else "≥ ") + str(t.get("at_most", t.get("at_least"))), met(t, "wall"),
              met(t, "cpu")] for name, t in targets.items()])
    return out
