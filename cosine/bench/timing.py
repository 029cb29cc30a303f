"""What every load generator measures, in one place: per-request timings, percentiles, Poisson arrivals.

Standard library only, so the cluster simulation uses the same definitions as ``cosine bench``.
"""

from __future__ import annotations

import random
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
