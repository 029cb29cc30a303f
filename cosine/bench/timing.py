"""What every load generator measures, in one place: per-request timings, percentiles, Poisson arrivals.

Standard library only, so the cluster simulation uses the same definitions as ``cosine bench``.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class RequestTiming:
    """One request: time to first token, then time per output token after it."""

    start: float
    first: float | None = None
    end: float | None = None
    tokens: int = 0

    @property
    def ttft(self) -> float:
        return (self.first or self.end or self.start) - self.start

    @property
    def tpot(self) -> float | None:
        if self.tokens < 2 or self.first is None or self.end is None:
            return None
        return (self.end - self.first) / (self.tokens - 1)


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize(timings: list[RequestTiming], wall: float, stats) -> dict:
    """One run's row: throughput over ``wall`` seconds, TTFT and per-token latency percentiles, and the
    acceptance of ``stats`` (a ``SpecStats``: drafts, drafted, accepted) where anything was drafted."""
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


def poisson_arrivals(n: int, rate_at: Callable[[float], float], send: Callable[[int], None], seed: int,
                     name: str = "arrival") -> float:
    """Open loop: call ``send(i)`` in a thread of its own at Poisson arrival times, whatever is in flight;
    ``rate_at(t)`` is the rate (requests/s) ``t`` seconds after the start. Returns the start time
    (``time.perf_counter``) once every call has returned."""
    rng = random.Random(seed)
    threads = []
    t0 = time.perf_counter()
    at = 0.0
    for i in range(n):
        at += rng.expovariate(rate_at(at))
        time.sleep(max(0.0, t0 + at - time.perf_counter()))
        th = threading.Thread(target=send, args=(i,), name=f"{name}-{i}")
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    return t0
