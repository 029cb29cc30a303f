"""``cosine bench cross-fusion``: token fusion inside one drafter process vs across drafter processes.

Systems (a verifier, a controller and the zoo's three experts; real processes over a private Redis):

* ``one-process``   — one drafter worker hosting all three experts: lockstep fusion in memory;
* ``cross-process`` — three drafter workers with one expert each, verifier ``--cross-process-fusion``: the
                      job's worker leads and asks the other two for their candidates at every position;
* ``separate``      — the same three workers without it: each request drafts with its own worker's expert.

Closed loop on mixed-domain prompts. Reported per system and concurrency: throughput, per-token latency,
mean acceptance length, the draft round trip the verifier sees (p50), and the network cost of fusion across
processes: round trips per draft job, the time a lead waits per round trip after its own forwards, asks per
round trip and timeouts.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from cosine.bench.counters import delta, worker_counters
from cosine.bench.e2e_bench import mixed_prompts, run_pipeline
from cosine.bench.report import environment
from cosine.markdown import table
from cosine.sampling_params import SamplingParams
from cosine.zoo import paths

log = logging.getLogger(__name__)

SYSTEMS = ("one-process", "cross-process", "separate")
EXPERTS = ("code", "prose", "records")


@dataclass
class CrossFusionConfig:
    zoo: str | None = None
    systems: tuple[str, ...] = SYSTEMS
    concurrency: tuple[int, ...] = (1, 4, 8)
    requests_per_client: int = 2
    min_requests: int = 12
    max_new_tokens: int = 48
    k: int = 4
    worker_threads: int = 1


def _specs(name: str, cfg: CrossFusionConfig, zoo) -> list:
    from cosine.deployment import WorkerSpec

    verifier = ["--k", str(cfg.k)] + (["--cross-process-fusion"] if name == "cross-process" else [])
    specs = [WorkerSpec("verifier", "verifier-0", verifier, cfg.worker_threads),
             WorkerSpec("controller", "controller-0", [])]
    if name == "one-process":
        return specs + [WorkerSpec("drafter", "drafter-0", [], cfg.worker_threads)]
    return specs + [WorkerSpec("drafter", f"drafter-{e}", ["--model", f"{e}={paths.drafter_dir(e, zoo)}"],
                               cfg.worker_threads) for e in EXPERTS]


def _sum(counters: dict[str, dict], key: str) -> float:
    return sum(float(w.get(key, 0) or 0) for w in counters.values() if w.get("role") == "drafter")


def run_system(name: str, cfg: CrossFusionConfig, zoo, bar) -> list[dict]:
    from cosine.deployment import Deployment

    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, ignore_eos=True)
    rows = []
    with Deployment(_specs(name, cfg, zoo), device="cpu", dtype="float32", zoo=cfg.zoo) as dep:
        run_pipeline(dep.url, mixed_prompts(zoo, 4), 2, SamplingParams(max_new_tokens=8))  # warm-up
        for c in cfg.concurrency:
            bar.set_postfix_str(f"{name}: c={c}")
            before = worker_counters(dep.url)
            row = run_pipeline(dep.url, mixed_prompts(zoo, max(cfg.min_requests, cfg.requests_per_client * c)), c,
                               params)
            after = worker_counters(dep.url)
            v0, v1 = before.get("verifier-0", {}), after.get("verifier-0", {})
            jobs = _sum(after, "jobs") - _sum(before, "jobs")
            vote_rounds = _sum(after, "vote_rounds") - _sum(before, "vote_rounds")
            wait_s = _sum(after, "vote_wait_s") - _sum(before, "vote_wait_s")
            row.update({
                "draft_jobs": int(jobs),
                "draft_rtt_p50_ms": float(v1.get("draft_rtt_p50_ms", 0) or 0),
                "late_drafts": int(delta(v0, v1, "late_drafts")),
                "vote_rounds": int(vote_rounds),
                "vote_rounds_per_job": round(vote_rounds / jobs, 3) if jobs else 0.0,
                "vote_wait_ms": round(1000 * wait_s / vote_rounds, 3) if vote_rounds else None,
                "asks_per_round": round((_sum(after, "vote_asks") - _sum(before, "vote_asks")) / vote_rounds, 2)
                if vote_rounds else None,
                "vote_timeouts": int(_sum(after, "vote_timeouts") - _sum(before, "vote_timeouts")),
            })
            rows.append({"system": name, "workload": f"closed c={c}", **row})
            bar.update(1)
    return rows


def run_cross_fusion_bench(cfg: CrossFusionConfig, progress: bool = True) -> dict:
    zoo = paths.zoo_dir(cfg.zoo)
    unknown = [s for s in cfg.systems if s not in SYSTEMS]
    if unknown:
        from cosine.errors import InvalidParameterError

        raise InvalidParameterError("systems", f"unknown {unknown}; choose from {list(SYSTEMS)}")
    bar = tqdm(total=len(cfg.systems) * len(cfg.concurrency), desc="cross-fusion", unit="run", disable=not progress)
    results: list[dict] = []
    for name in cfg.systems:
        results += run_system(name, cfg, zoo, bar)
    bar.close()
    return {"benchmark": "cross-fusion", "environment": environment(),
            "config": {**asdict(cfg), "zoo": str(zoo)}, "results": results}


def cross_fusion_markdown(payload: dict) -> str:
    cfg, env = payload["config"], payload["environment"]

    def f(v, fmt="{:.1f}"):
        return "–" if v is None else fmt.format(v)

    rows = [[r["system"], r["workload"], f(r["throughput_tok_s"]), f(r.get("tpot_p50_ms")),
             f(r.get("mean_acceptance_length"), "{:.2f}"), f(r.get("draft_rtt_p50_ms")),
             f(r.get("vote_rounds_per_job"), "{:.2f}"), f(r.get("vote_wait_ms"), "{:.2f}"),
             f(r.get("asks_per_round"), "{:.1f}"), str(r.get("vote_timeouts", 0))]
            for r in payload["results"]]
    head = ["system", "load", "tok/s", "TPOT p50 ms", "accept. len", "draft RTT p50 ms", "round trips / job",
            "wait / round trip ms", "asks / round trip", "timeouts"]
    return (f"Fusion inside one drafter process vs across three (one expert each), git {env.get('git_sha', '?')[:7]}, "
            f"{env.get('cpu', '?')}; {cfg['max_new_tokens']} tokens per request, k={cfg['k']}, mixed-domain "
            f"prompts, closed loop.\n\n" + table(head, rows))
