"""``cosine load``: open-loop overload against a local deployment, to show back-pressure instead of collapse.

First a closed loop measures the deployment's saturation rate (requests per second). Then Poisson arrivals
at several multiples of it (2x and 5x by default), each for a while. Every arrival is submitted through the
producer client with a bound on what the deployment holds (``max_outstanding``). A submit past the bound
gets :class:`~cosine.errors.OverloadedError` at once; an accepted request must complete or end with an
explicit error. Each overload level reports:
- offered and accepted rates;
- the share refused;
- completed and lost (must be 0);
- the latency of accepted requests;
- goodput against saturation;
- Redis's and the workers' memory at the start and the end of the level (flat, not growing).
"""

from __future__ import annotations

import concurrent.futures
import logging
import random
import statistics
import threading
import time

from cosine.broker import RedisSettings, connect
from cosine.chaos import rss_mb
from cosine.client import Client
from cosine.errors import OverloadedError, RequestError
from cosine.local_redis import LocalRedis

log = logging.getLogger(__name__)


def _memory(url: str, dep) -> dict:
    used = connect(RedisSettings(url=url)).info("memory").get("used_memory", 0) / 2**20
    return {"redis_mb": round(used, 2), "workers_mb": round(sum(rss_mb(p.pid) for p in dep.procs.values()), 1)}


def _saturation(url: str, prompts: list[str], max_new_tokens: int, seconds: float, clients: int = 8) -> float:
    """Requests per second the deployment completes with ``clients`` in a closed loop."""
    done = []
    stop = time.monotonic() + seconds

    def loop(i: int) -> None:
        with Client(url) as c:
            while time.monotonic() < stop:
                c.generate(prompts[i % len(prompts)], max_new_tokens=max_new_tokens)
                done.append(1)
                i += clients

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(done) / (time.monotonic() - t0)


def _level(url: str, dep, prompts: list[str], rate: float, seconds: float, max_new_tokens: int,
           max_outstanding: int, rng: random.Random) -> dict:
    """Poisson arrivals at ``rate`` for ``seconds``; waits for every accepted request to end."""
    latencies: list[float] = []
    outcomes = {"completed": 0, "explicit_errors": 0, "lost": 0}
    lock = threading.Lock()

    def wait(client: Client, rid: str, t0: float) -> None:
        try:
            client.result(rid, timeout=120)
            key = "completed"
        except RequestError:
            key = "explicit_errors"
        except Exception:  # noqa: BLE001 - anything but an explicit error is a lost request
            log.exception("request %s lost", rid)
            key = "lost"
        with lock:
            outcomes[key] += 1
            if key == "completed":
                latencies.append(time.monotonic() - t0)

    before = _memory(url, dep)
    offered = refused = 0
    tokens = 0
    with Client(url, max_outstanding=max_outstanding) as client, \
            concurrent.futures.ThreadPoolExecutor(max_workers=max_outstanding + 8) as pool:
        t_start = time.monotonic()
        next_at = t_start
        while next_at < t_start + seconds:
            time.sleep(max(0.0, next_at - time.monotonic()))
            offered += 1
            try:
                rid = client.submit(prompts[offered % len(prompts)], max_new_tokens=max_new_tokens)
                pool.submit(wait, client, rid, time.monotonic())
            except OverloadedError:
                refused += 1
            next_at += rng.expovariate(rate)
        pool.shutdown(wait=True)
        wall = time.monotonic() - t_start
        tokens = outcomes["completed"] * max_new_tokens
    after = _memory(url, dep)
    ordered = sorted(latencies)
    return {
        "offered_rps": round(offered / seconds, 2), "accepted_rps": round((offered - refused) / seconds, 2),
        "refused_share": round(refused / max(1, offered), 3), **outcomes,
        "latency_p50_s": round(statistics.median(ordered), 2) if ordered else None,
        "latency_p99_s": round(ordered[int(0.99 * (len(ordered) - 1))], 2) if ordered else None,
        "goodput_tok_s": round(tokens / wall, 1), "memory_before": before, "memory_after": after,
    }


def run_load(multiples: tuple[float, ...] = (2.0, 5.0), seconds: float = 30.0, max_new_tokens: int = 32,
             max_outstanding: int = 32, seed: int = 0, zoo: str | None = None) -> dict:
    from cosine.bench.e2e_bench import mixed_prompts
    from cosine.deployment import Deployment, WorkerSpec

    rng = random.Random(seed)
    prompts = mixed_prompts(zoo, 12)
    specs = [WorkerSpec("verifier", "verifier-0"), WorkerSpec("drafter", "drafter-0")]
    with LocalRedis() as server, Deployment(specs, redis_url=server.url, device="cpu", dtype="float32",
                                            zoo=zoo) as dep:
        saturation = _saturation(server.url, prompts, max_new_tokens, min(seconds, 15.0))
        levels = {}
        for m in multiples:
            levels[f"{m:g}x"] = _level(server.url, dep, prompts, m * saturation, seconds, max_new_tokens,
                                       max_outstanding, rng)
    return {"saturation_rps": round(saturation, 2), "saturation_tok_s": round(saturation * max_new_tokens, 1),
            "max_outstanding": max_outstanding, "seconds": seconds, "max_new_tokens": max_new_tokens,
            "levels": levels}


def markdown(report: dict) -> str:
    rows = ["| load | offered req/s | accepted req/s | refused | completed | lost | latency p50 / p99 (s) "
            "| goodput tok/s (saturation " + f"{report['saturation_tok_s']:.0f}) | Redis MB before → after "
            "| workers MB before → after |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, lv in report["levels"].items():
        rows.append(f"| {name} | {lv['offered_rps']} | {lv['accepted_rps']} | {lv['refused_share']:.0%} "
                    f"| {lv['completed']} | {lv['lost']} | {lv['latency_p50_s']} / {lv['latency_p99_s']} "
                    f"| {lv['goodput_tok_s']} | {lv['memory_before']['redis_mb']} → {lv['memory_after']['redis_mb']} "
                    f"| {lv['memory_before']['workers_mb']} → {lv['memory_after']['workers_mb']} |")
    return "\n".join(rows) + "\n"
