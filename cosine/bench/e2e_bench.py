"""``cosine bench``: end-to-end, closed-loop, on the same cores in one run.

Paths compared at each concurrency level (closed loop: each of ``c`` clients sends its next request when
the previous one finishes):

* ``target-only``   — the engine's batched autoregressive loop, in this process, 2 threads;
* ``coupled``       — the engine's single-process speculative decoding (draft then verify), 2 threads;
* ``pipeline``      — a drafter process and a verifier process (1 thread each) connected only through a
                      private Redis, driven by the producer client.

Every path decodes the same held-out mixed-domain prompts greedily to the same length (end-of-text
ignored so every request yields ``max_new_tokens``). Reported: throughput, time to first token, per-token
latency (time per output token after the first, per request) p50/p99, mean acceptance length, and for the
pipeline the verifier and drafter busy fractions and the messaging overhead (Redis + serialisation time
on the verifier's round path, as a share of its forward time).
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from cosine.bench.report import environment
from cosine.bench.timing import RequestTiming, percentile
from cosine.engine.sequence import Sequence, SpecStats
from cosine.engine.speculative import SpecConfig, SpeculativeEngine
from cosine.markdown import table
from cosine.sampling_params import SamplingParams
from cosine.zoo import paths

log = logging.getLogger(__name__)

PATHS = ("target-only", "coupled", "pipeline")


@dataclass
class E2EBenchConfig:
    zoo: str | None = None
    concurrency: tuple[int, ...] = (1, 4, 8, 16)
    requests_per_client: int = 3
    min_requests: int = 12
    max_new_tokens: int = 64
    k: int = 4
    tree_width: int = 1
    inproc_threads: int = 2
    worker_threads: int = 1
    paths: tuple[str, ...] = PATHS


def summarize(timings: list[RequestTiming], wall: float, stats: SpecStats) -> dict:
    tokens = sum(t.tokens for t in timings)
    tpots = [t.tpot for t in timings if t.tpot is not None]
    ttfts = [t.ttft for t in timings]
    return {
        "requests": len(timings),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "throughput_tok_s": round(tokens / wall, 2) if wall else 0.0,
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 2) if ttfts else None,
        "tpot_p50_ms": round(1000 * percentile(tpots, 0.5), 2) if tpots else None,
        "tpot_p99_ms": round(1000 * percentile(tpots, 0.99), 2) if tpots else None,
        "mean_acceptance_length": round(stats.mean_acceptance_length, 3) if stats.drafts else None,
        "acceptance_rate": round(stats.acceptance_rate, 3) if stats.drafts else None,
        "tpots_ms": sorted(round(1000 * t, 2) for t in tpots),  # every request's, for pooling across runs
    }


def mixed_prompts(zoo, n: int) -> list[str]:
    by_domain = paths.load_prompts(zoo)
    mixed = [texts[i] for i in range(max(len(t) for t in by_domain.values())) for _, texts in sorted(by_domain.items())
             if i < len(texts)]
    return (mixed * (n // len(mixed) + 1))[:n]


def run_inprocess(engine: SpeculativeEngine, prompts: list[str], concurrency: int, params: SamplingParams,
                  speculative: bool) -> dict:
    """Closed loop on the single-process engine with continuous batching."""
    ids = [engine.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    drafters = engine.choose_drafters(ids) if speculative else [None] * len(ids)
    queue = list(range(len(ids)))
    active: list[Sequence] = []
    timing: dict[str, RequestTiming] = {}
    stats = SpecStats()
    t0 = time.perf_counter()
    while queue or active:
        new = []
        while queue and len(active) + len(new) < concurrency:
            i = queue.pop(0)
            seq = Sequence(ids[i], params, drafter=drafters[i])
            timing[seq.seq_id] = RequestTiming(time.perf_counter())
            new.append(seq)
        if new:
            engine.verifier.admit(new)
            active += new
        engine.run_round(active)
        now = time.perf_counter()
        done = []
        for seq in active:
            t = timing[seq.seq_id]
            if seq.output_ids and t.first is None:
                t.first = now
            t.tokens = len(seq.output_ids)
            if seq.finished:
                t.end = now
                stats.merge(seq.stats)
                done.append(seq)
        if done:
            engine.release([s.seq_id for s in done])
            active = [s for s in active if not s.finished]
    return summarize(list(timing.values()), time.perf_counter() - t0, stats)


def stream_one(client, prompt, params: SamplingParams, **request) -> tuple[RequestTiming, dict]:
    """Send one request through the producer client and time it; returns its timing and final stats."""
    t = RequestTiming(time.perf_counter())
    final: dict = {}
    for chunk in client.stream(prompt, max_new_tokens=params.max_new_tokens, ignore_eos=params.ignore_eos, **request):
        if chunk.token_ids and t.first is None:
            t.first = time.perf_counter()
        t.tokens += len(chunk.token_ids)
        if chunk.finished:
            final = chunk.stats or {}
    t.end = time.perf_counter()
    return t, final


def spec_stats(final: dict) -> SpecStats:
    return SpecStats(drafts=final.get("drafts", 0), drafted=final.get("drafted", 0), accepted=final.get("accepted", 0))


def run_pipeline(url: str, prompts: list[str], concurrency: int, params: SamplingParams, **request) -> dict:
    """Closed loop through the producer client: ``concurrency`` threads, each streaming its requests."""
    from cosine.client import Client

    shares = [prompts[i::concurrency] for i in range(concurrency)]
    timings: list[RequestTiming] = []
    stats = SpecStats()
    lock = threading.Lock()
    errors: list[Exception] = []

    def client_loop(mine: list[str]) -> None:
        try:
            with Client(url) as c:
                for p in mine:
                    t, final = stream_one(c, p, params, **request)
                    with lock:
                        timings.append(t)
                        stats.merge(spec_stats(final))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client_loop, args=(s,)) for s in shares if s]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return summarize(timings, time.perf_counter() - t0, stats)


def worker_counters(url: str) -> dict[str, dict]:
    from cosine.broker import RedisSettings, Streams, connect
    from cosine.keys import Keys

    s = Streams(connect(RedisSettings(url=url)), Keys())
    return s.live_workers()


def delta(before: dict, after: dict, key: str) -> float:
    return float(after.get(key, 0) or 0) - float(before.get(key, 0) or 0)


def run_e2e_bench(cfg: E2EBenchConfig, progress: bool = True) -> dict:
    zoo = paths.zoo_dir(cfg.zoo)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, ignore_eos=True)
    n_for = {c: max(cfg.min_requests, cfg.requests_per_client * c) for c in cfg.concurrency}
    results: list[dict] = []
    plan = [(p, c) for p in cfg.paths for c in cfg.concurrency]
    bar = tqdm(total=len(plan), desc="bench", unit="run", disable=not progress)

    if "target-only" in cfg.paths or "coupled" in cfg.paths:
        torch.set_num_threads(cfg.inproc_threads)
        engine = SpeculativeEngine.from_zoo(zoo, device="cpu", dtype="float32",
                                            config=SpecConfig(k=cfg.k, tree_width=cfg.tree_width))
        warm = mixed_prompts(zoo, 2)
        engine.generate(warm, SamplingParams(max_new_tokens=8))
        for path in ("target-only", "coupled"):
            if path not in cfg.paths:
                continue
            for c in cfg.concurrency:
                bar.set_postfix_str(f"{path} c={c}")
                row = run_inprocess(engine, mixed_prompts(zoo, n_for[c]), c, params, speculative=path == "coupled")
                results.append({"path": path, "concurrency": c, "threads": cfg.inproc_threads, **row})
                bar.update(1)
        del engine

    if "pipeline" in cfg.paths:
        from cosine.deployment import Deployment, WorkerSpec

        specs = [
            WorkerSpec("verifier", "verifier-0", ["--k", str(cfg.k), "--tree-width", str(cfg.tree_width)],
                       cfg.worker_threads),
            WorkerSpec("drafter", "drafter-0", [], cfg.worker_threads),
        ]
        with Deployment(specs, device="cpu", dtype="float32", zoo=cfg.zoo) as dep:
            run_pipeline(dep.url, mixed_prompts(zoo, 4), 2, SamplingParams(max_new_tokens=8))  # warm-up
            for c in cfg.concurrency:
                bar.set_postfix_str(f"pipeline c={c}")
                before = worker_counters(dep.url)
                t0 = time.perf_counter()
                row = run_pipeline(dep.url, mixed_prompts(zoo, n_for[c]), c, params)
                elapsed = time.perf_counter() - t0
                after = worker_counters(dep.url)
                v0, v1 = before.get("verifier-0", {}), after.get("verifier-0", {})
                d0, d1 = before.get("drafter-0", {}), after.get("drafter-0", {})
                busy = delta(v0, v1, "busy_s")
                messaging = delta(v0, v1, "messaging_s")
                rounds = delta(v0, v1, "rounds")
                row.update({
                    "verifier_busy": round(busy / elapsed, 3),
                    "drafter_busy": round(delta(d0, d1, "busy_s") / elapsed, 3),
                    "messaging_share_of_step": round(messaging / busy, 4) if busy else None,
                    "messaging_ms_per_round": round(1000 * messaging / rounds, 3) if rounds else None,
                    "verify_ms_per_round": round(1000 * busy / rounds, 3) if rounds else None,
                    "late_drafts": int(delta(v0, v1, "late_drafts")),
                    "stale_drafts": int(delta(v0, v1, "stale_drafts")),
                })
                results.append({"path": "pipeline", "concurrency": c, "threads": cfg.worker_threads, **row})
                bar.update(1)
    bar.close()
    return {
        "benchmark": "e2e",
        "environment": environment(),
        "config": {**asdict(cfg), "zoo": str(zoo)},
        "results": results,
        "targets": targets(results),
    }


def targets(results: list[dict]) -> dict:
    """The issue's targets, checked on this run's numbers."""
    def get(path, c, key):
        return next((r[key] for r in results if r["path"] == path and r["concurrency"] == c), None)

    out = {}
    shares = [r["messaging_share_of_step"] for r in results if r["path"] == "pipeline" and r.get(
        "messaging_share_of_step") is not None]
    if shares:
        out["messaging_overhead_max"] = {"value": max(shares), "target": 0.05, "met": max(shares) <= 0.05}
    p8, c8, t8 = (get(p, 8, "throughput_tok_s") for p in ("pipeline", "coupled", "target-only"))
    if p8 and c8:
        out["pipeline_vs_coupled_c8"] = {"value": round(p8 / c8, 3), "target": 1.5, "met": p8 / c8 >= 1.5}
    if p8 and t8:
        out["pipeline_vs_target_only_c8"] = {"value": round(p8 / t8, 3), "target": 2.0, "met": p8 / t8 >= 2.0}
    busy = get("pipeline", 8, "verifier_busy")
    if busy is not None:
        out["verifier_busy_c8"] = {"value": busy, "target": 0.85, "met": busy >= 0.85}
    return out


def e2e_markdown(payload: dict) -> str:
    env, cfg = payload["environment"], payload["config"]
    rows = []
    for r in payload["results"]:
        rows.append([
            r["path"], r["concurrency"], r["throughput_tok_s"], r["ttft_p50_ms"], r["tpot_p50_ms"], r["tpot_p99_ms"],
            r["mean_acceptance_length"] or "—",
            r.get("verifier_busy", "—"), r.get("drafter_busy", "—"),
            "—" if r.get("messaging_share_of_step") is None else f"{100 * r['messaging_share_of_step']:.1f}%",
        ])
    t = table(["path", "concurrency", "tokens/s", "TTFT p50 (ms)", "per-token p50 (ms)", "per-token p99 (ms)",
               "mean acceptance length", "verifier busy", "drafter busy", "messaging / verify step"], rows)
    tg = table(["target", "measured", "goal", "met"],
               [[k, v["value"], v["target"], "yes" if v["met"] else "**no**"] for k, v in payload["targets"].items()])
    note = (f"Closed loop, {cfg['max_new_tokens']} new tokens per request (greedy, end-of-text ignored), held-out "
            f"mixed-domain prompts; k={cfg['k']}, tree width {cfg['tree_width']}; in-process paths "
            f"{cfg['inproc_threads']} threads, pipeline workers {cfg['worker_threads']} thread each; "
            f"{env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}; git {env['git_sha']}, {env['time']}.")
    return f"{t}\n\n{tg}\n\n{note}"


def e2e_plots(payload: dict, out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for path in PATHS:
        rows = [r for r in payload["results"] if r["path"] == path]
        if not rows:
            continue
        xs = [r["concurrency"] for r in rows]
        axes[0].plot(xs, [r["throughput_tok_s"] for r in rows], marker="o", label=path)
        axes[1].plot(xs, [r["tpot_p50_ms"] for r in rows], marker="o", label=path)
        axes[2].plot(xs, [r["ttft_p50_ms"] for r in rows], marker="o", label=path)
    for ax, title in zip(axes, ["throughput (tokens/s)", "per-token latency p50 (ms)", "time to first token p50 (ms)"]):
        ax.set_title(title)
        ax.set_xlabel("concurrency")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"CoSine end-to-end ({payload['environment']['cpu']}, git {payload['environment']['git_sha']})")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
