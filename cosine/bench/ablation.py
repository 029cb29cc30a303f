"""``cosine bench ablation``: what each of CoSine's mechanisms is worth, on the same cores in one run.

Systems compared (each a fresh local deployment: one verifier, one drafter worker hosting the zoo's
expert drafters, 1 thread each, and the controller, over a private Redis):

* ``cosine``          — everything on: routing, fusion, scheduling, adaptive speculation, lookahead;
* ``no-routing`` … ``no-lookahead`` — one mechanism off at a time (``no-adaptive`` drafts the fixed k;
                        ``fixed-k2``, ``fixed-k6`` and ``fixed-k8`` are the same at other lengths, so
                        adaptive control is compared with the best fixed length);
* ``plain-dsd``       — plain distributed speculative decoding: one fixed drafter for every request, fixed
                        k, no scheduling, no lookahead, no controller;
* ``coupled`` and ``target-only`` — the single-process engine (as in ``cosine bench e2e``);
* ``hf-generate``, ``hf-batched``, ``hf-assisted`` — what a user would run instead, Hugging Face ``generate``
                        (:mod:`cosine.bench.hf_baselines`), closed loop only, once per view.

Placement as in ``cosine bench e2e`` (:mod:`cosine.bench.pinning`): every deployment's verifier and drafter
pinned to their own cores, one torch thread per core, Redis, the controller and the client on the
drafter's; the baselines node-emulated (on the verifier's cores) and with equal compute (every core the
deployment uses); the engine's loops with equal compute. Each pipeline row carries the verifier's pass
breakdown (:mod:`cosine.bench.counters`).

Workloads (mixed-domain held-out prompts, greedy, end-of-text ignored): closed loop at the given
concurrency levels, and open loop with Poisson arrivals at a low, a high and a fluctuating rate (the rate
switches between low and high every ``fluctuate_s`` seconds). Reported per system and workload:
throughput, per-token latency p50/p99, time to first token, mean acceptance length, and the counters
that explain them (lookahead hits, late drafts, controller decisions).

After the sweep, the comparisons a drift of the machine can tip (CoSine against plain DSD at c=8, against
the sweep's two best fixed lengths under fluctuating load, and against each baseline it has a target
against) run again, alternated on fresh deployments (:mod:`cosine.bench.repeats`); those targets are
computed from the pooled repeats.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from cosine.bench.ablation_report import ablation_markdown, ablation_plots  # noqa: F401 - re-exported
from cosine.bench.counters import fresh_counters, pipeline_counters
from cosine.bench.e2e_bench import (
    client_side,
    mixed_prompts,
    pipeline_specs,
    placement,
    run_inprocess,
    run_pipeline,
    spec_stats,
    stream_one,
)
from cosine.bench.hf_baselines import HF_PATHS
from cosine.bench.pinning import EQUAL, format_cpus, parse_layout, pinned, view_cpus, views
from cosine.bench.repeats import (
    C8,
    FIXED_K,
    FLUCTUATING,
    pooled_by_pair,
    ratio_interval,
    rivals,
    run_repeats,
)
from cosine.bench.repeats import cell_value as _get
from cosine.bench.repeats import ratio as _ratio
from cosine.bench.report import environment
from cosine.bench.timing import RequestTiming, poisson_arrivals, summarize
from cosine.bench.versus import add_limits, hf_name, hf_targets, versus
from cosine.bench.versus import rivals as hf_rivals
from cosine.engine.sequence import SpecStats
from cosine.policy.cost_model import CostModel
from cosine.sampling_params import SamplingParams
from cosine.zoo import paths

log = logging.getLogger(__name__)

# System -> (verifier flags, drafter flags, controller on).
SYSTEMS: dict[str, tuple[list[str], list[str], bool]] = {
    "cosine": ([], [], True),
    "no-routing": (["--no-routing"], [], True),
    "no-fusion": (["--no-fusion"], [], True),
    "no-scheduling": (["--no-scheduling"], [], True),
    "no-adaptive": (["--no-adaptive"], [], True),  # fixed k = the run's k
    "fixed-k2": (["--no-adaptive", "--k", "2"], [], True),  # with no-adaptive: the fixed lengths to beat
    "fixed-k6": (["--no-adaptive", "--k", "6"], [], True),
    "fixed-k8": (["--no-adaptive", "--k", "8"], [], True),  # 8: the controller's highest k_max
    "no-lookahead": ([], ["--no-lookahead"], True),
    "plain-dsd": (["--no-routing", "--no-fusion", "--no-scheduling", "--no-adaptive"], ["--no-lookahead"], False),
}
IN_PROCESS = ("coupled", "target-only")


@dataclass
class AblationConfig:
    zoo: str | None = None
    systems: tuple[str, ...] = (*SYSTEMS, *IN_PROCESS, *HF_PATHS)
    concurrency: tuple[int, ...] = (1, 4, 8, 16)
    # Closed loop: requests each client sends. At 2, a run at c=8 was 16 requests, 3 s: cells of one system
    # differed by more than the mechanisms did (CoSine at c=8: 1.06x plain DSD in one run, 1.21x at 6).
    requests_per_client: int = 6
    min_requests: int = 6
    # Low and high Poisson arrival rates (requests/s): the high one is at or above what one verifier serves on
    # two cores (about 5 requests/s of 48 tokens on an AMD EPYC, 7 on an Intel Xeon), so the fluctuating run
    # alternates calm and bursts that queue.
    rates: tuple[float, float] = (1.0, 8.0)
    open_requests: int = 24  # requests per open-loop run at a steady rate
    # The fluctuating run's requests: about four low/high cycles, so that its p99 is not just its single
    # slowest request (at 48, the nearest-rank p99 was the maximum, and repeats of one system ranged
    # 75-119 ms), and the rate switches at least three times, which a run of open_requests would not.
    fluctuating_requests: int = 144
    fluctuate_s: float = 4.0
    # After the sweep, the c=8 and the fluctuating comparisons run again this many times per system,
    # alternated on fresh deployments (cosine.bench.repeats); their targets use these runs. 0: the sweep's.
    # At 3, three sets of the same code put adaptive control's pooled fluctuating p99 at 0.88x, 1.15x and
    # 0.95x the fixed length's (per draw 95-295 ms): the draws differ more than the systems do.
    repeats: int = 5
    max_new_tokens: int = 48
    k: int = 4
    plain_drafter: str | None = None  # plain-dsd's fixed drafter; default: the zoo's best on average
    worker_threads: int = 1  # pipeline workers' torch threads when nothing is pinned (else one per core)
    cpus: tuple[str, ...] = ()  # ROLE=CPUS items (pinning.parse_layout); (): verifier core 0, drafter 1
    seed: int = 0
    cost_model: str | None = None  # the verifiers' cost model (a `cosine profile` file); None: the built-in one


def best_single_drafter(zoo) -> str:
    """The drafter with the highest mean acceptance length averaged over domains (from the zoo's card)."""
    evaluation = paths.load_manifest(zoo).get("evaluation", {})
    matrix = evaluation.get("acceptance_matrix", {}).get("mean_acceptance_length", {})  # drafter -> domain
    if not matrix:
        return paths.drafter_domains(zoo)[0]
    return max(matrix, key=lambda d: sum(matrix[d].values()) / len(matrix[d]))


def run_open_loop(url: str, prompts: list[str], rate_at, params: SamplingParams, seed: int) -> dict:
    """Poisson arrivals: request ``i`` is sent at the arrival time drawn for it, whatever is in flight."""
    from cosine.client import Client

    timings: list[RequestTiming] = []
    stats = SpecStats()
    lock = threading.Lock()
    errors: list[Exception] = []
    client = Client(url)

    def one(p: str) -> None:
        try:
            t, final = stream_one(client, p, params)
            with lock:
                timings.append(t)
                stats.merge(spec_stats(final))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t0 = poisson_arrivals(len(prompts), rate_at, lambda i: one(prompts[i]), seed)
    client.close()
    if errors:
        raise errors[0]
    return summarize(timings, time.perf_counter() - t0, stats)


def _workloads(cfg: AblationConfig) -> list[tuple[str, object]]:
    low, high = cfg.rates
    return ([(f"closed c={c}", c) for c in cfg.concurrency]
            + [(f"poisson {low}/s", (lambda t: low, cfg.open_requests)),
               (f"poisson {high}/s", (lambda t: high, cfg.open_requests)),
               ("poisson fluctuating", (lambda t: low if int(t / cfg.fluctuate_s) % 2 == 0 else high,
                                        cfg.fluctuating_requests))])


def _run_workload(url: str, zoo, cfg: AblationConfig, load, params: SamplingParams, seed: int) -> dict:
    if isinstance(load, int):
        n = max(cfg.min_requests, cfg.requests_per_client * load)
        return run_pipeline(url, mixed_prompts(zoo, n), load, params)
    rate_at, n = load
    return run_open_loop(url, mixed_prompts(zoo, n), rate_at, params, seed)


@contextmanager
def _deployed(name: str, cfg: AblationConfig, zoo):
    """A fresh local deployment of one system, placed as ``cfg.cpus`` says, warmed up."""
    from cosine.deployment import Deployment

    v_args, d_args, controller = SYSTEMS[name]
    if name == "plain-dsd":
        one = cfg.plain_drafter or best_single_drafter(zoo)
        d_args = [*d_args, "--model", f"{one}={paths.drafter_dir(one, zoo)}"]
    if cfg.cost_model:
        v_args = [*v_args, "--cost-model", cfg.cost_model]
    layout = parse_layout(cfg.cpus)
    specs = pipeline_specs(layout, ["--k", str(cfg.k), *v_args], d_args, controller, cfg.worker_threads)
    with Deployment(specs, device="cpu", dtype="float32", zoo=cfg.zoo,
                    redis_cpus=layout["drafter"] if layout else None) as dep:
        with client_side(layout):
            run_pipeline(dep.url, mixed_prompts(zoo, 4), 2, SamplingParams(max_new_tokens=8))  # warm-up
        yield dep


def _measure(url: str, zoo, cfg: AblationConfig, load, seed: int) -> dict:
    """One workload on a running deployment (the client on the drafter's cores), with the worker counters
    that explain it, from the heartbeats that bracket the run."""
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, ignore_eos=True)
    with client_side(parse_layout(cfg.cpus)):
        before = fresh_counters(url)
        t0 = time.perf_counter()
        row = _run_workload(url, zoo, cfg, load, params, seed)
        wall = time.perf_counter() - t0
        after = fresh_counters(url)
    return {**row, **pipeline_counters(before, after, wall)}


def run_system(name: str, cfg: AblationConfig, zoo, bar, where: dict | None = None) -> list[dict]:
    """Every workload on one fresh deployment of ``name``; ``where`` gets its placement, read back from the OS."""
    rows = []
    with _deployed(name, cfg, zoo) as dep:
        if where is not None and not where:
            where.update(placement(dep, parse_layout(cfg.cpus)))
        for label, load in _workloads(cfg):
            bar.set_postfix_str(f"{name}: {label}")
            rows.append({"system": name, "workload": label, **_measure(dep.url, zoo, cfg, load, cfg.seed)})
            bar.update(1)
    return rows


def run_head_to_head(results: list[dict], cfg: AblationConfig, zoo, bar, hf=None) -> list[dict]:
    """The sweep's drift-prone comparisons again, alternated on fresh deployments (cosine.bench.repeats);
    open-loop repeat ``r`` draws its arrivals with seed ``cfg.seed + 1 + r``. A baseline runs in this
    process, on its view's cores."""
    loads = dict(_workloads(cfg))
    layout = parse_layout(cfg.cpus)
    baselines = {hf_name(p, v): (p, v) for p in HF_PATHS for v in views(layout)}

    def measure(system: str, workload: str, r: int) -> dict:
        if system in baselines:
            return _run_hf(hf, *baselines[system], cfg, zoo, loads[workload])
        with _deployed(system, cfg, zoo) as dep:
            return _measure(dep.url, zoo, cfg, loads[workload], cfg.seed + 1 + r)

    pairs = rivals(results) + (hf_rivals(results, "cosine", views(layout)) if hf is not None else [])
    return run_repeats(pairs, cfg.repeats, measure, bar)


def run_inprocess_system(name: str, cfg: AblationConfig, zoo, bar) -> list[dict]:
    from cosine.engine.speculative import SpecConfig, SpeculativeEngine

    cpus = view_cpus(parse_layout(cfg.cpus), EQUAL)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, ignore_eos=True)
    rows = []
    with pinned(cpus):
        engine = SpeculativeEngine.from_zoo(zoo, device="cpu", dtype="float32", config=SpecConfig(k=cfg.k))
        engine.generate(mixed_prompts(zoo, 2), SamplingParams(max_new_tokens=8))
        for label, load in _workloads(cfg):
            if not isinstance(load, int):
                bar.update(1)  # the single-process engine has no arrival process: closed loop only
                continue
            bar.set_postfix_str(f"{name}: {label}")
            n = max(cfg.min_requests, cfg.requests_per_client * load)
            row = run_inprocess(engine, mixed_prompts(zoo, n), load, params, speculative=name == "coupled")
            rows.append({"system": name, "workload": label, "view": EQUAL, "cpus": format_cpus(cpus), **row})
            bar.update(1)
    return rows


def _hf_loads(path: str, cfg: AblationConfig) -> list[tuple[str, int]]:
    """The closed-loop workloads a baseline runs: one request at a time once (c=1), batches at each c > 1."""
    if path != "hf-batched":
        return [("closed c=1", 1)]
    return [(label, load) for label, load in _workloads(cfg) if isinstance(load, int) and load > 1]


def _run_hf(hf, path: str, view: str, cfg: AblationConfig, zoo, c: int) -> dict:
    cpus = view_cpus(parse_layout(cfg.cpus), view)
    n = max(cfg.min_requests, cfg.requests_per_client * c)
    with pinned(cpus):
        return {"view": view, "cpus": format_cpus(cpus),
                **hf.run(path, mixed_prompts(zoo, n), c, cfg.max_new_tokens)}


def run_hf_systems(hf, cfg: AblationConfig, zoo, bar) -> list[dict]:
    """Every baseline asked for, in each view (:mod:`cosine.bench.hf_baselines`)."""
    rows = []
    for view in views(parse_layout(cfg.cpus)):
        with pinned(view_cpus(parse_layout(cfg.cpus), view)):
            hf.warm_up(mixed_prompts(zoo, 2))
        for path in (p for p in HF_PATHS if p in cfg.systems):
            for label, c in _hf_loads(path, cfg):
                bar.set_postfix_str(f"{hf_name(path, view)}: {label}")
                rows.append({"system": hf_name(path, view), "workload": label,
                             **_run_hf(hf, path, view, cfg, zoo, c)})
                bar.update(1)
    return rows


def run_ablation(cfg: AblationConfig, progress: bool = True) -> dict:
    zoo = paths.zoo_dir(cfg.zoo)
    known = [*SYSTEMS, *IN_PROCESS, *HF_PATHS]
    unknown = [s for s in cfg.systems if s not in known]
    if unknown:
        from cosine.errors import InvalidParameterError

        raise InvalidParameterError("systems", f"unknown {unknown}; choose from {known}")
    layout = parse_layout(cfg.cpus)
    cost = CostModel.load(cfg.cost_model) if cfg.cost_model else CostModel.default()
    pipelines = [s for s in cfg.systems if s not in IN_PROCESS and s not in HF_PATHS]
    hf_paths = [p for p in HF_PATHS if p in cfg.systems]
    total = (len(pipelines) + sum(s in IN_PROCESS for s in cfg.systems)) * len(_workloads(cfg)) + len(
        views(layout)) * sum(len(_hf_loads(p, cfg)) for p in hf_paths)
    bar = tqdm(total=total, desc="ablation", unit="run", disable=not progress)
    results: list[dict] = []
    where: dict[str, str] = {}
    for name in cfg.systems:
        if name in IN_PROCESS:
            results += run_inprocess_system(name, cfg, zoo, bar)
        elif name not in HF_PATHS:
            results += run_system(name, cfg, zoo, bar, where)
    hf = None
    if hf_paths:
        from cosine.bench.hf_baselines import HFBaselines

        hf = HFBaselines(zoo)
        results += run_hf_systems(hf, cfg, zoo, bar)
    repeats = run_head_to_head(results, cfg, zoo, bar, hf) if cfg.repeats else []
    bar.close()
    limit = add_limits(results, pipelines, views(layout))
    return {
        "benchmark": "ablation",
        "environment": environment(),
        "config": {**asdict(cfg), "zoo": str(zoo), "plain_drafter": cfg.plain_drafter or best_single_drafter(zoo),
                   "views": list(views(layout))},
        "placement": where,
        "physical_limit": limit,
        "cost_model": cost.to_dict(),
        "results": results,
        "repeats": repeats,
        "versus": versus(results, "cosine", views(layout), cfg.concurrency),
        "targets": {**ablation_targets(results, cfg, repeats), **hf_targets(results, repeats, "cosine", views(layout))},
    }


def ablation_targets(results: list[dict], cfg: AblationConfig, repeats: list[dict] | None = None) -> dict:
    """The issue's targets, checked on this run's numbers (mean acceptance length pooled over workloads).

    Throughput at c=8 and adaptive control under fluctuating load use the head-to-head ``repeats`` where
    they hold both systems (pooled, :mod:`cosine.bench.repeats`), else the sweep's cells."""
    def mal(system: str) -> float | None:
        vals = [r["mean_acceptance_length"] for r in results if r["system"] == system and r["mean_acceptance_length"]]
        return sum(vals) / len(vals) if vals else None

    out: dict[str, dict] = {}
    plain, no_fusion, full = mal("plain-dsd"), mal("no-fusion"), mal("cosine")
    if plain and no_fusion:
        v = _ratio(no_fusion, plain)
        out["routing_acceptance_gain"] = {"value": v, "target": 1.2, "met": v >= 1.2,
                                          "what": "mean acceptance length, routing without fusion / one fixed drafter"}
    if full and no_fusion:
        v = _ratio(full, no_fusion)
        out["fusion_acceptance_gain"] = {"value": v, "target": 1.1, "met": v >= 1.1,
                                         "what": "mean acceptance length, with fusion / without"}
    pools = pooled_by_pair(repeats or [])

    def pair(system: str, rival: str, workload: str) -> tuple[dict, dict, int]:
        """The two systems' numbers on ``workload`` and the runs behind each: pooled repeats where both have
        them, else the sweep's cells (0 runs)."""
        if (system, workload) in pools and (rival, workload) in pools:
            return pools[(system, workload)], pools[(rival, workload)], pools[(system, workload)]["runs"]
        cells = [{key: _get(results, s, workload, key) for key in ("throughput_tok_s", "tpot_p99_ms")}
                 for s in (system, rival)]
        return cells[0], cells[1], 0

    def how(runs: int) -> str:
        return f"{runs} alternated runs each, pooled" if runs else "the sweep's cells"

    def interval(system: str, rival: str, workload: str, keys: tuple[str, ...]) -> str:
        """The bootstrap interval of the pooled ratios over the repeats (:func:`ratio_interval`); "—" without."""
        rows = [r for r in repeats or [] if r["workload"] == workload]
        iv = ratio_interval([r for r in rows if r["system"] == system], [r for r in rows if r["system"] == rival], keys)
        if not iv:
            return "—"
        names = {"throughput_tok_s": "throughput", "tpot_p99_ms": "p99"}
        return ", ".join(f"{lo:.2f}–{hi:.2f}x {names[k]}" if len(keys) > 1 else f"{lo:.2f}–{hi:.2f}"
                         for k, (lo, hi) in iv.items())

    fixed = [n for n in FIXED_K if _get(results, n, FLUCTUATING, "throughput_tok_s")]
    named = [r for w, _, r in rivals(results) if w == FLUCTUATING]
    if named:
        sides = {rival: pair("cosine", rival, FLUCTUATING) for rival in named}
        runs = min(n for _, _, n in sides.values())
        if runs:  # each rival repeated: adaptive control must beat each
            what = f"{' and '.join(named)}, the sweep's lowest p99s of {', '.join(fixed)}, each; {how(runs)}"
        else:  # the sweep's cells: the best fixed length per metric, each
            best = {"throughput_tok_s": max(_get(results, n, FLUCTUATING, "throughput_tok_s") for n in fixed),
                    "tpot_p99_ms": min(_get(results, n, FLUCTUATING, "tpot_p99_ms") or math.inf for n in fixed)}
            sides = {"": (sides[named[0]][0], best, 0)}
            what = f"the best of {', '.join(fixed)} per metric, {how(runs)}"
        ratios = {rival: tuple(_ratio(a[key], b[key]) for key in ("throughput_tok_s", "tpot_p99_ms"))
                  for rival, (a, b, _) in sides.items()}
        named_each = (lambda r: f" ({r})") if len(ratios) > 1 else (lambda r: "")  # noqa: E731
        if all(tp and p99 for tp, p99 in ratios.values()):
            out["adaptive_fluctuating"] = {
                "value": "; ".join(f"{tp}x throughput, {p99}x p99{named_each(r)}" for r, (tp, p99) in ratios.items()),
                "target": "> 1x throughput, < 1x p99",
                "met": all(tp > 1 and p99 < 1 for tp, p99 in ratios.values()),
                "what": f"adaptive vs the best fixed k under fluctuating load ({what})",
                "interval": "; ".join(interval("cosine", r, FLUCTUATING, ("throughput_tok_s", "tpot_p99_ms"))
                                      + named_each(r) for r in ratios),
            }
    la, pl = _get(results, "cosine", "closed c=1", "tpot_p50_ms"), _get(results, "plain-dsd", "closed c=1", "tpot_p50_ms")
    if la and pl:
        v = _ratio(la, pl)
        out["lookahead_latency_c1"] = {"value": v, "target": 0.75, "met": v <= 0.75,
                                       "what": "per-token latency p50 at c=1, CoSine / plain DSD"}
    a, b, runs = pair("cosine", "plain-dsd", C8)
    v = _ratio(a["throughput_tok_s"], b["throughput_tok_s"])
    if v:
        out["throughput_c8"] = {"value": v, "target": 1.3, "met": v >= 1.3,
                                "what": f"throughput at c=8, CoSine / plain DSD ({how(runs)})",
                                "interval": interval("cosine", "plain-dsd", C8, ("throughput_tok_s",))}
    return out
