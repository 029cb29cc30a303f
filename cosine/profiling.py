"""Profile a target and its drafters on this machine and fit a :class:`~cosine.policy.cost_model.CostModel`.

Verification: real target forwards through :class:`~cosine.engine.runner.ModelRunner`, over a grid of
batch sizes, context lengths and draft nodes per row (half the rows feed chains, half token trees with a
sibling per depth, as fused drafts do). Each (context) block prefills its largest batch once and drops rows
for the smaller batches; each cell is one warm-up forward and the median of a few timed ones; the drafted
slots are rolled back after every forward so the context stays put.

Drafting: :class:`~cosine.engine.draft_model.Drafter` jobs of 1-8 steps over 1-16 rows (the real drafting
path: catch-up of the last token, forwards, tree building), pooled over the drafters given.

The whole run keeps to ``time_budget_s``: a quick probe predicts what each block will cost, and blocks
that would not fit their share of the remaining time are shrunk (fewer batches, fewer node counts, fewer
repeats) or skipped; the smallest blocks always run so the fit has something to stand on.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from cosine.engine.draft_model import Drafter, DraftRequest
from cosine.engine.models import load_model, resolve_device, resolve_dtype
from cosine.engine.runner import ModelRunner, Segment
from cosine.errors import InvalidParameterError
from cosine.policy.cost_model import CostModel, now_iso

log = logging.getLogger(__name__)

BATCHES = (16, 8, 4, 2, 1)  # measured largest first: one prefill per context, rows dropped after
CONTEXTS = (32, 384, 128)  # the extremes first, so a shrunk run still spans the range
NODES = (0, 8, 2, 4)  # draft nodes per row, extremes first
DRAFT_BATCHES = (16, 4, 1)
DRAFT_STEPS = (1, 8, 4)
DRAFT_CONTEXT = 128
REPEATS = 3  # timed forwards per cell (median), after one warm-up
MIN_CELLS = 4  # cells measured whatever the budget, so that the fit has something to stand on
VERIFY_SHARE = 0.75  # of the budget, when drafters are profiled too
# Smaller versions of a context block, tried in turn when the full one would not fit its time share.
LADDER = (
    (BATCHES, NODES, REPEATS),
    ((16, 4, 1), (0, 8, 4), REPEATS),
    ((8, 4, 1), (0, 8), 2),
    ((4, 1), (0, 8), 1),
    ((2, 1), (0, 8), 1),
)


@dataclass
class _Rates:
    """Crude per-token speeds from a probe, used to predict what a block will cost before it runs."""

    base_ms: float
    token_ms: float

    def forward_ms(self, rows: int, context: int, tokens_per_row: int) -> float:
        return self.base_ms + self.token_ms * rows * tokens_per_row * (1 + context / 512)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tree_segment(tokens: list[int], tree: bool) -> Segment:
    """Root + draft nodes: a chain, or a spine with one sibling per depth (a fused draft's shape)."""
    if not tree:
        return Segment.chain(tokens)
    parents = [-1]
    spine = 0
    while len(parents) < len(tokens):
        parents.append(spine)
        new_spine = len(parents) - 1
        if len(parents) < len(tokens):
            parents.append(spine)
        spine = new_spine
    return Segment(list(tokens), parents)


class _Clock:
    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.deadline = self.start + budget_s

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _time_forward(runner: ModelRunner, segments: list[Segment], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    runner.forward(segments)
    _sync(device)
    ms = (time.perf_counter() - t) * 1000
    # Roll the drafted slots back (nothing committed) and squeeze the holes out now and then.
    runner.commit(torch.zeros((runner.kv.rows, max(len(s) for s in segments)), dtype=torch.bool))
    if runner.kv.physical - max(runner.lengths()) >= 32:
        runner.kv.compact()
    return ms


def _probe(runner: ModelRunner, vocab: int, device: torch.device, gen: torch.Generator) -> _Rates:
    """One row: prefill 64 tokens, then a few single-token forwards: the fixed cost and the per-token cost."""
    runner.add_rows(["warm-up"], torch.randint(0, vocab, (1, 16), generator=gen).tolist())
    _time_forward(runner, [Segment.chain([1])], device)
    runner.remove_rows(["warm-up"])
    prefix = torch.randint(0, vocab, (1, 64), generator=gen).tolist()
    _sync(device)
    t = time.perf_counter()
    runner.add_rows(["probe"], prefix)
    _sync(device)
    prefill_ms = (time.perf_counter() - t) * 1000
    base = statistics.median(_time_forward(runner, [Segment.chain([1])], device) for _ in range(3))
    runner.remove_rows(["probe"])
    return _Rates(base_ms=base, token_ms=max(prefill_ms - base, 0.0) / 64 + 1e-3)


def _block_ms(rates: _Rates, fit: CostModel | None, context: int, batches, nodes, repeats: int) -> float:
    predict = (
        (lambda b, n: fit.verify_ms(b, context, b * (1 + n)))
        if fit is not None
        else (lambda b, n: rates.forward_ms(b, context, 1 + n))
    )
    prefill = rates.forward_ms(max(batches), context, context)
    return prefill + sum((repeats + 1) * predict(b, n) for b in batches for n in nodes)


def _profile_target(
    model, clock: _Clock, budget_s: float, repeats: int, bar, device: torch.device
) -> tuple[list[tuple[int, int, int, float]], dict]:
    runner = ModelRunner(model, "target")
    vocab = runner.vocab_size
    gen = torch.Generator().manual_seed(0)
    rates = _probe(runner, vocab, device, gen)
    log.info("probe: %.2f ms per forward, %.4f ms per prefill token", rates.base_ms, rates.token_ms)
    samples: list[tuple[int, int, int, float]] = []
    grid: dict[str, dict] = {}
    end = clock.start + budget_s
    weights = {c: c + 64 for c in CONTEXTS}
    for i, context in enumerate(CONTEXTS):
        remaining = CONTEXTS[i:]
        share = (end - time.perf_counter()) * weights[context] / sum(weights[c] for c in remaining)
        fit = None
        if len(samples) >= 6:
            fit = CostModel().fit_verify(samples)
        chosen = None
        for batches, nodes, reps in LADDER:
            reps = min(reps, repeats)
            if _block_ms(rates, fit, context, batches, nodes, reps) / 1000 <= share:
                chosen = (batches, nodes, reps)
                break
        if chosen is None:
            if samples:
                log.info("context %d skipped: %.1f s left", context, end - time.perf_counter())
                bar.total -= len(BATCHES) * len(NODES)
                bar.refresh()
                continue
            chosen = LADDER[-1][:2] + (1,)  # nothing measured yet: the smallest block always runs
        batches, nodes, reps = chosen
        bar.total -= len(BATCHES) * len(NODES) - len(batches) * len(nodes)
        bar.refresh()
        ids = [f"r{j}" for j in range(max(batches))]
        runner.add_rows(ids, torch.randint(0, vocab, (len(ids), context), generator=gen).tolist())
        done_cells = 0
        for b in batches:
            if len(samples) >= MIN_CELLS and time.perf_counter() > end:
                break
            runner.remove_rows(ids[b:])
            for n in nodes:
                if len(samples) >= MIN_CELLS and time.perf_counter() > end:
                    break
                times = []
                for r in range(reps + 1):
                    segments = [
                        _tree_segment(torch.randint(0, vocab, (1 + n,), generator=gen).tolist(), tree=row % 2 == 1)
                        for row in range(b)
                    ]
                    ms = _time_forward(runner, segments, device)
                    if r > 0:
                        times.append(ms)
                samples.append((b, context, b * (1 + n), statistics.median(times)))
                done_cells += 1
                bar.update(1)
        runner.remove_rows(ids)
        bar.total -= len(batches) * len(nodes) - done_cells
        bar.refresh()
        grid[str(context)] = {"batches": list(batches), "nodes": list(nodes), "repeats": reps, "cells": done_cells}
    return samples, grid


def _profile_drafters(
    models: dict[str, torch.nn.Module], clock: _Clock, repeats: int, bar, device: torch.device
) -> tuple[list[tuple[int, int, float]], dict]:
    samples: list[tuple[int, int, float]] = []
    grid: dict[str, int] = {}
    gen = torch.Generator().manual_seed(1)
    for i, (name, model) in enumerate(models.items()):
        if clock.left() <= 0 and len(samples) >= MIN_CELLS:
            log.info("drafter %s skipped: the time budget is spent", name)
            bar.total -= len(DRAFT_BATCHES) * len(DRAFT_STEPS)
            bar.refresh()
            continue
        share_end = time.perf_counter() + clock.left() / (len(models) - i)
        drafter = Drafter(ModelRunner(model, name), name)
        vocab = drafter.runner.vocab_size
        # The full grid takes about 0.3 s per zoo drafter on one CPU core; with less time, fewer and
        # smaller cells.
        roomy = (share_end - time.perf_counter()) > 0.5
        batches = DRAFT_BATCHES if roomy else (4, 1)
        reps = repeats if roomy else 1
        reqs = [
            DraftRequest(f"d{j}", torch.randint(0, vocab, (DRAFT_CONTEXT + 1,), generator=gen).tolist(), 1)
            for j in range(max(batches))
        ]
        drafter.draft(reqs)  # catch-up: prefill every row
        cells = 0
        for b in batches:
            drafter.release([r.seq_id for r in reqs[b:]])
            for steps in DRAFT_STEPS:
                # The first cells always run: the fit needs a few points.
                if time.perf_counter() > share_end and len(samples) >= MIN_CELLS:
                    break
                for r in reqs[:b]:
                    r.k = steps
                times = []
                for rep in range(reps + 1):
                    _sync(device)
                    t = time.perf_counter()
                    drafter.draft(reqs[:b])
                    _sync(device)
                    if rep > 0:
                        times.append((time.perf_counter() - t) * 1000)
                samples.append((b, steps, statistics.median(times)))
                cells += 1
                bar.update(1)
        drafter.release([r.seq_id for r in reqs])
        bar.total -= len(DRAFT_BATCHES) * len(DRAFT_STEPS) - cells
        bar.refresh()
        grid[name] = cells
    return samples, grid


def run_profile(
    target_path: str | os.PathLike[str],
    drafter_paths: dict[str, str | os.PathLike[str]] | None = None,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    threads: int | None = None,
    time_budget_s: float = 60.0,
    progress: bool = True,
    repeats: int = REPEATS,
) -> CostModel:
    """Measure the target's verification passes and the drafters' jobs here; return the fitted cost model.

    ``threads`` sets torch's intra-op threads for the run (restored after). Without drafters the drafting
    coefficients are :meth:`CostModel.default`'s. Keeps to ``time_budget_s`` (loading included) by
    shrinking the grid; the metadata records what was measured.
    """
    if not time_budget_s > 0:
        raise InvalidParameterError("time_budget_s", f"must be > 0, got {time_budget_s!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InvalidParameterError("threads", f"must be an integer >= 1, got {threads!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise InvalidParameterError("repeats", f"must be an integer >= 1, got {repeats!r}")
    drafter_paths = dict(drafter_paths or {})
    clock = _Clock(time_budget_s)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    total = len(BATCHES) * len(NODES) * len(CONTEXTS) + len(DRAFT_BATCHES) * len(DRAFT_STEPS) * len(drafter_paths)
    bar = tqdm(total=total, desc="profiling", unit="cell", disable=not progress, leave=False)
    try:
        target = load_model(target_path, str(dev), dt)
        drafters = {name: load_model(path, str(dev), dt) for name, path in drafter_paths.items()}
        verify_budget = clock.left() * (VERIFY_SHARE if drafters else 1.0)
        verify_samples, verify_grid = _profile_target(target, clock, clock.elapsed() + verify_budget, repeats, bar, dev)
        draft_samples, draft_grid = _profile_drafters(drafters, clock, repeats, bar, dev) if drafters else ([], {})
    finally:
        bar.close()
        torch.set_num_threads(previous_threads)
    model = CostModel.default() if not draft_samples else CostModel()
    model.metadata = {}
    model.padded = ModelRunner.PADDED
    model.fit_verify(verify_samples)
    if draft_samples:
        model.fit_draft(draft_samples)
    model.metadata.update(
        {
            "device": str(dev),
            "dtype": str(dt).removeprefix("torch."),
            "target": os.fspath(target_path),
            "drafters": {n: os.fspath(p) for n, p in drafter_paths.items()},
            "created": now_iso(),
            "threads": threads if threads is not None else previous_threads,
            "machine": platform.machine(),
            "torch": torch.__version__,
            "time_budget_s": time_budget_s,
            "wall_s": round(clock.elapsed(), 2),
            "sample_count": len(verify_samples) + len(draft_samples),
            "grid": {"verify": verify_grid, "draft": draft_grid or "not profiled (defaults)"},
            "samples": {
                "verify": [[b, c, t, round(ms, 4)] for b, c, t, ms in verify_samples],
                "draft": [[b, s, round(ms, 4)] for b, s, ms in draft_samples],
            },
        }
    )
    log.info("profile done in %.1f s: verify %s, draft %s", clock.elapsed(), model.verify_coefficients(),
             model.draft_coefficients())
    return model


def profile_zoo(zoo: str | os.PathLike[str] | None = None, **kwargs) -> CostModel:
    """:func:`run_profile` on the demo zoo's target and all its drafters."""
    from cosine.zoo import paths

    root = paths.zoo_dir(zoo)
    drafters = {n: paths.drafter_dir(n, root) for n in paths.drafter_domains(root)}
    return run_profile(paths.target_dir(root), drafters, **kwargs)
