"""``cosine bench sim``: the ablation table at cluster scale, in simulation.

The real verifier and drafter services, the real controller and policies and a real Redis run in this
process; model forwards are replaced by cost models of a 70B target on 4xA100 and 68M drafters on
consumer GPUs, with acceptance drawn from the zoo's measured per-domain rates (see :mod:`cosine.sim`).
Every output is checked against the simulated target's own continuation (lossless in simulation).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from cosine.bench.ablation import ablation_targets
from cosine.bench.repeats import rivals, run_repeats
from cosine.bench.report import environment
from cosine.local_redis import LocalRedis
from cosine.policy.steering import Switches

log = logging.getLogger(__name__)

# System -> (switches, drafter lookahead, controller on, one fixed expert, fixed k (None: the run's k)).
SIM_SYSTEMS: dict[str, tuple[Switches, bool, bool, bool, int | None]] = {
    "cosine": (Switches(), True, True, False, None),
    "no-routing": (Switches(routing=False), True, True, False, None),
    "no-fusion": (Switches(fusion=False), True, True, False, None),
    "no-scheduling": (Switches(scheduling=False), True, True, False, None),
    "no-adaptive": (Switches(adaptive=False), True, True, False, None),
    "fixed-k2": (Switches(adaptive=False), True, True, False, 2),
    "fixed-k6": (Switches(adaptive=False), True, True, False, 6),
    "fixed-k8": (Switches(adaptive=False), True, True, False, 8),
    "no-lookahead": (Switches(), False, True, False, None),
    "plain-dsd": (Switches(False, False, False, False), False, False, True, None),
    "target-only": (Switches(), False, False, False, None),
}


@dataclass
class SimBenchConfig:
    verifiers: int = 2
    drafters: int = 16
    systems: tuple[str, ...] = tuple(SIM_SYSTEMS)
    concurrency: tuple[int, ...] = (1, 8, 32)
    rates: tuple[float, float] = (4.0, 16.0)  # low and high Poisson rates (requests/s)
    fluctuate_s: float = 3.0
    requests: int = 48  # per run (closed loop: at least 2 per client)
    fluctuating_requests: int = 96  # enough for the rate to switch at least three times
    max_new_tokens: int = 64
    k: int = 4
    repeats: int = 3  # head-to-head repeats of the c=8 and fluctuating comparisons (cosine.bench.repeats)
    plain_expert: str = "prose"  # the zoo's best single drafter averaged over domains
    time_scale: float = 1.0


def _workloads(cfg: SimBenchConfig) -> list[tuple[str, dict]]:
    low, high = cfg.rates
    return ([(f"closed c={c}", {"concurrency": c, "n": max(cfg.requests // 2, 2 * c)}) for c in cfg.concurrency]
            + [(f"poisson {low}/s", {"rate": low, "n": cfg.requests}),
               (f"poisson {high}/s", {"rate": high, "n": cfg.requests}),
               ("poisson fluctuating", {"rate": lambda t: low if int(t / cfg.fluctuate_s) % 2 == 0 else high,
                                        "n": cfg.fluctuating_requests})])


@contextmanager
def _cluster(name: str, cfg: SimBenchConfig, redis_url: str):
    """A fresh simulated cluster of one system, warmed up; yields it and the request fields it needs."""
    from cosine.sim.cluster import SimCluster, run_workload

    switches, lookahead, controller, fixed, k = SIM_SYSTEMS[name]
    experts = (cfg.plain_expert,) if fixed else ("code", "prose", "records")
    cluster = SimCluster(redis_url, verifiers=cfg.verifiers, drafters=cfg.drafters,
                         experts_per_drafter=experts, verifier_switches=switches, controller=controller,
                         time_scale=cfg.time_scale, verifier_settings={"k": k or cfg.k},
                         drafter_settings={"lookahead": lookahead})
    request = {"speculation": "off"} if name == "target-only" else {}
    with cluster:
        run_workload(cluster, 4, concurrency=2, max_new_tokens=8, **request)  # warm-up
        yield cluster, request


def _run(cluster, cfg: SimBenchConfig, load: dict, request: dict, seed: int = 0) -> dict:
    from cosine.sim.cluster import run_workload

    kw = {"concurrency": load["concurrency"]} if "concurrency" in load else {"rate": load["rate"]}
    row = run_workload(cluster, load["n"], max_new_tokens=cfg.max_new_tokens, seed=seed, **kw, **request)
    row.pop("cluster", None)
    return row


def run_sim_bench(cfg: SimBenchConfig, progress: bool = True) -> dict:
    plan = _workloads(cfg)
    bar = tqdm(total=len(cfg.systems) * len(plan), desc="sim", unit="run", disable=not progress)
    results: list[dict] = []
    with LocalRedis() as srv:
        for name in cfg.systems:
            with _cluster(name, cfg, srv.url) as (cluster, request):
                for label, load in plan:
                    bar.set_postfix_str(f"{name}: {label}")
                    results.append({"system": name, "workload": label, **_run(cluster, cfg, load, request)})
                    bar.update(1)
        # The drift-prone comparisons again, alternated on fresh clusters (cosine.bench.repeats); repeat r
        # draws its prompts and arrivals with seed 1 + r.
        loads = dict(plan)

        def measure(system: str, workload: str, r: int) -> dict:
            with _cluster(system, cfg, srv.url) as (cluster, request):
                return _run(cluster, cfg, loads[workload], request, seed=1 + r)

        repeats = run_repeats(rivals(results), cfg.repeats, measure, bar)
    bar.close()
    return {
        "benchmark": "sim",
        "environment": environment(),
        "config": asdict(cfg),
        "results": results,
        "repeats": repeats,
        "targets": ablation_targets(results, cfg, repeats),  # type: ignore[arg-type]
    }


def sim_markdown(payload: dict) -> str:
    from cosine.bench.ablation import ablation_markdown

    cfg = payload["config"]
    lossless = all(r["lossless"] for r in payload["results"])
    failed = [f"{r['system']} {r['workload']}: {r['requests'] - r['completed']}" for r in payload["results"]
              if r["completed"] < r["requests"]]
    head = (f"Simulated cluster: {cfg['verifiers']} verifiers (70B target on 4xA100 each, cost model), "
            f"{cfg['drafters']} drafter workers (68M drafters on RTX 3090s, each hosting the three experts; "
            f"plain DSD: `{cfg['plain_expert']}` only), real Redis, real services, controller and policies; "
            f"{cfg['max_new_tokens']} tokens per request, k={cfg['k']} where fixed; Poisson rates {cfg['rates'][0]} "
            f"and {cfg['rates'][1]} requests/s, {cfg['requests']} requests per run ({cfg.get('fluctuating_requests')} "
            f"in the fluctuating one, switching every {cfg['fluctuate_s']} s); every output "
            f"{'equal to' if lossless else '**not** always equal to'} the simulated target's own"
            f"{'; requests that ended with an error: ' + ', '.join(failed) if failed else ''}.\n\n")
    return head + ablation_markdown(payload, note=False)
