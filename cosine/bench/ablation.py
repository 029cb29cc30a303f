"""``cosine bench ablation``: what each of CoSine's mechanisms is worth, on the same cores in one run.

Systems compared (each a fresh local deployment: one verifier, one drafter worker hosting the zoo's
expert drafters, 1 thread each, and the controller, over a private Redis):

* ``cosine``          — everything on: routing, fusion, scheduling, adaptive speculation, lookahead;
* ``no-routing`` … ``no-lookahead`` — one mechanism off at a time (``no-adaptive`` drafts the fixed k;
                        ``fixed-k2``, ``fixed-k6`` and ``fixed-k8`` are the same at other lengths, so
                        adaptive control is compared with the best fixed length);
* ``plain-dsd``       — plain distributed speculative decoding: one fixed drafter for every request, fixed
                        k, no scheduling, no lookahead, no controller;
* ``coupled`` and ``target-only`` — the single-process engine, 2 threads (as in ``cosine bench e2e``).

Workloads (mixed-domain held-out prompts, greedy, end-of-text ignored): closed loop at the given
concurrency levels, and open loop with Poisson arrivals at a low, a high and a fluctuating rate (the rate
switches between low and high every ``fluctuate_s`` seconds). Reported per system and workload:
throughput, per-token latency p50/p99, time to first token, mean acceptance length, and the counters
that explain them (lookahead hits, late drafts, controller decisions).

After the sweep, the two comparisons a drift of the machine can tip (CoSine against plain DSD at c=8, and
against the sweep's two best fixed lengths under fluctuating load) run again, alternated on fresh
deployments (:mod:`cosine.bench.repeats`); those targets are computed from the pooled repeats.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from cosine.bench.e2e_bench import (
    delta,
    mixed_prompts,
    run_inprocess,
    run_pipeline,
    spec_stats,
    stream_one,
    summarize,
    worker_counters,
)
from cosine.bench.repeats import (
    C8,
    FIXED_K,
    FLUCTUATING,
    INTERVAL_LEVEL,
    pooled_by_pair,
    ratio_interval,
    rivals,
    run_repeats,
)
from cosine.bench.repeats import cell_value as _get
from cosine.bench.repeats import ratio as _ratio
from cosine.bench.report import environment
from cosine.bench.timing import RequestTiming, poisson_arrivals
from cosine.engine.sequence import SpecStats
from cosine.markdown import table
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
    systems: tuple[str, ...] = (*SYSTEMS, *IN_PROCESS)
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
    worker_threads: int = 1
    inproc_threads: int = 2
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
    """A fresh local deployment of one system, warmed up."""
    from cosine.deployment import Deployment, WorkerSpec

    v_args, d_args, controller = SYSTEMS[name]
    if name == "plain-dsd":
        one = cfg.plain_drafter or best_single_drafter(zoo)
        d_args = [*d_args, "--model", f"{one}={paths.drafter_dir(one, zoo)}"]
    if cfg.cost_model:
        v_args = [*v_args, "--cost-model", cfg.cost_model]
    specs = [WorkerSpec("verifier", "verifier-0", ["--k", str(cfg.k), *v_args], cfg.worker_threads),
             WorkerSpec("drafter", "drafter-0", d_args, cfg.worker_threads)]
    if controller:
        specs.append(WorkerSpec("controller", "controller-0", []))
    with Deployment(specs, device="cpu", dtype="float32", zoo=cfg.zoo) as dep:
        run_pipeline(dep.url, mixed_prompts(zoo, 4), 2, SamplingParams(max_new_tokens=8))  # warm-up
        yield dep


def _measure(url: str, zoo, cfg: AblationConfig, load, seed: int) -> dict:
    """One workload on a running deployment, with the worker counters that explain it."""
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, ignore_eos=True)
    before = worker_counters(url)
    row = _run_workload(url, zoo, cfg, load, params, seed)
    after = worker_counters(url)
    v0, v1 = before.get("verifier-0", {}), after.get("verifier-0", {})
    d0, d1 = before.get("drafter-0", {}), after.get("drafter-0", {})
    row.update({
        "lookahead_hits": int(delta(d0, d1, "lookahead_hits")),
        "lookahead_misses": int(delta(d0, d1, "lookahead_misses")),
        "late_drafts": int(delta(v0, v1, "late_drafts")),
        "control_version": int(v1.get("control_version", 0) or 0),
    })
    return row


def run_system(name: str, cfg: AblationConfig, zoo, bar) -> list[dict]:
    rows = []
    with _deployed(name, cfg, zoo) as dep:
        for label, load in _workloads(cfg):
            bar.set_postfix_str(f"{name}: {label}")
            rows.append({"system": name, "workload": label, **_measure(dep.url, zoo, cfg, load, cfg.seed)})
            bar.update(1)
    return rows


def run_head_to_head(results: list[dict], cfg: AblationConfig, zoo, bar) -> list[dict]:
    """The sweep's drift-prone comparisons again, alternated on fresh deployments (cosine.bench.repeats);
    open-loop repeat ``r`` draws its arrivals with seed ``cfg.seed + 1 + r``."""
    loads = dict(_workloads(cfg))

    def measure(system: str, workload: str, r: int) -> dict:
        with _deployed(system, cfg, zoo) as dep:
            return _measure(dep.url, zoo, cfg, loads[workload], cfg.seed + 1 + r)

    return run_repeats(rivals(results), cfg.repeats, measure, bar)


def run_inprocess_system(name: str, cfg: AblationConfig, zoo, bar) -> list[dict]:
    import torch

    from cosine.engine.speculative import SpecConfig, SpeculativeEngine

    torch.set_num_threads(cfg.inproc_threads)
    engine = SpeculativeEngine.from_zoo(zoo, device="cpu", dtype="float32", config=SpecConfig(k=cfg.k))
    engine.generate(mixed_prompts(zoo, 2), SamplingParams(max_new_tokens=8))
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, ignore_eos=True)
    rows = []
    for label, load in _workloads(cfg):
        if not isinstance(load, int):
            bar.update(1)  # the single-process engine has no arrival process: closed loop only
            continue
        bar.set_postfix_str(f"{name}: {label}")
        n = max(cfg.min_requests, cfg.requests_per_client * load)
        row = run_inprocess(engine, mixed_prompts(zoo, n), load, params, speculative=name == "coupled")
        rows.append({"system": name, "workload": label, **row})
        bar.update(1)
    return rows


def run_ablation(cfg: AblationConfig, progress: bool = True) -> dict:
    zoo = paths.zoo_dir(cfg.zoo)
    unknown = [s for s in cfg.systems if s not in SYSTEMS and s not in IN_PROCESS]
    if unknown:
        from cosine.errors import InvalidParameterError

        raise InvalidParameterError("systems", f"unknown {unknown}; choose from {[*SYSTEMS, *IN_PROCESS]}")
    cost = CostModel.load(cfg.cost_model) if cfg.cost_model else CostModel.default()
    bar = tqdm(total=len(cfg.systems) * len(_workloads(cfg)), desc="ablation", unit="run", disable=not progress)
    results: list[dict] = []
    for name in cfg.systems:
        results += (run_inprocess_system if name in IN_PROCESS else run_system)(name, cfg, zoo, bar)
    repeats = run_head_to_head(results, cfg, zoo, bar) if cfg.repeats else []
    bar.close()
    return {
        "benchmark": "ablation",
        "environment": environment(),
        "config": {**asdict(cfg), "zoo": str(zoo), "plain_drafter": cfg.plain_drafter or best_single_drafter(zoo)},
        "cost_model": cost.to_dict(),
        "results": results,
        "repeats": repeats,
        "targets": ablation_targets(results, cfg, repeats),
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


def ablation_markdown(payload: dict, note: bool = True) -> str:
    env, cfg = payload["environment"], payload["config"]
    workloads = list(dict.fromkeys(r["workload"] for r in payload["results"]))
    systems = list(dict.fromkeys(r["system"] for r in payload["results"]))

    def cell(system, workload, key, fmt="{:.0f}"):
        v = _get(payload["results"], system, workload, key)
        return "—" if v is None else fmt.format(v)

    tp = table(["system", *workloads], [[s, *(cell(s, w, "throughput_tok_s") for w in workloads)] for s in systems])
    lat = table(["system", *workloads],
                [[s, *(f"{cell(s, w, 'tpot_p50_ms')} / {cell(s, w, 'tpot_p99_ms')}" for w in workloads)]
                 for s in systems])
    mal = table(["system", *workloads],
                [[s, *(cell(s, w, "mean_acceptance_length", "{:.2f}") for w in workloads)] for s in systems])
    tg = table(["target", "what", "measured", f"{INTERVAL_LEVEL:.0%} interval over the repeats", "goal", "met"],
               [[k, v["what"], v["value"], v.get("interval", "—"), v["target"], "yes" if v["met"] else "**no**"]
                for k, v in payload["targets"].items()])
    tables = (f"Throughput (tokens/s)\n\n{tp}\n\nPer-token latency p50 / p99 (ms)\n\n{lat}\n\n"
              f"Mean acceptance length\n\n{mal}\n\n{tg}")
    if payload.get("repeats"):
        tables += "\n\n" + repeats_markdown(payload["repeats"])
    if not note:
        return f"{tables}\n\ngit {env['git_sha']}, {env['time']}."
    text = (f"{cfg['max_new_tokens']} new tokens per request (greedy, end-of-text ignored), mixed-domain held-out "
            f"prompts; closed loop: {cfg['requests_per_client']} requests per client (at least "
            f"{cfg['min_requests']} per run); k={cfg['k']} where fixed; Poisson rates {cfg['rates'][0]} and "
            f"{cfg['rates'][1]} requests/s "
            f"(fluctuating: switching every {cfg['fluctuate_s']} s), {cfg['open_requests']} requests per open-loop "
            f"run ({cfg.get('fluctuating_requests', cfg['open_requests'])} in the fluctuating one); "
            f"plain DSD drafts with `{cfg['plain_drafter']}` only; workers 1 thread each, in-process paths "
            f"{cfg['inproc_threads']} threads; {env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}; "
            f"git {env['git_sha']}, {env['time']}.")
    return f"{tables}\n\n{text}"


def repeats_markdown(rows: list[dict]) -> str:
    """The head-to-head repeats: each run's throughput and p99, and the pooled numbers the targets use."""
    body = [[w, s, str(p["runs"]), ", ".join(f"{v:.0f}" for v in p["runs_tok_s"]), f"{p['throughput_tok_s']:.0f}",
             ", ".join("—" if v is None else f"{v:.0f}" for v in p["runs_p99_ms"]),
             f"{p['tpot_p50_ms']:.0f} / {p['tpot_p99_ms']:.0f}" if p["tpot_p99_ms"] is not None else "—"]
            for (s, w), p in pooled_by_pair(rows).items()]
    return ("Head-to-head repeats (after the sweep; a workload's systems alternated on fresh deployments, new arrivals "
            "per open-loop repeat, the same for both)\n\n"
            + table(["workload", "system", "runs", "tokens/s per run", "tokens/s pooled", "p99 per run (ms)",
                     "p50 / p99 pooled (ms)"], body))


def ablation_plots(payload: dict, out_png: str) -> None:
    """Throughput and per-token latency p99 per system for every workload (grouped bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = payload["results"]
    workloads = list(dict.fromkeys(r["workload"] for r in results))
    systems = list(dict.fromkeys(r["system"] for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(16, 4.8))
    width = 0.8 / max(1, len(systems))
    colours = plt.get_cmap("tab20").colors  # more systems than the default cycle's 10 colours
    for i, system in enumerate(systems):
        xs = [j + i * width for j in range(len(workloads))]
        for ax, key in zip(axes, ("throughput_tok_s", "tpot_p99_ms")):
            ax.bar(xs, [_get(results, system, w, key) or 0 for w in workloads], width, label=system,
                   color=colours[(2 * i) % 20 + (2 * i) // 20])
    for ax, title in zip(axes, ("throughput (tokens/s)", "per-token latency p99 (ms)")):
        ax.set_title(title)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(workloads))], workloads, rotation=20, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    env = payload["environment"]
    fig.suptitle(f"CoSine ablations ({env['cpu']}, git {env['git_sha']})")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
