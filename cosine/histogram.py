"""Latency histograms with fixed buckets: counted by each verifier, published in its heartbeat, summed across
verifiers by readers (``cosine metrics``, the dashboard), and turned into percentiles the way Prometheus's
``histogram_quantile`` does (linear inside the bucket holding the rank).

Fixed bounds (vLLM's for the same three quantities) make histograms from different workers add up bucket by
bucket. A heartbeat carries ``{"ttft": [counts..., sum], ...}``: one count per bound plus the overflow bucket,
then the sum of the observations in seconds.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

# Seconds. Time to first token, time per output token after the first, and request latency (end to end).
BOUNDS: dict[str, tuple[float, ...]] = {
    "ttft": (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
             40.0, 80.0, 160.0, 640.0, 2560.0),
    "tpot": (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
             80.0),
    "e2e": (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
            960.0, 1920.0, 7680.0),
}

HELP = {
    "ttft": "Time to first token: from the request's admission entry to its first output chunk.",
    "tpot": "Time per output token after the first, per request: (end - first token) / (tokens - 1).",
    "e2e": "Request latency: from the request's admission entry to its final chunk.",
}


@dataclass
class Histogram:
    """Counts per bucket (the last bucket is everything above the last bound) and the sum of observations."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def add(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.total += other.total

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile, linear within its bucket (None when empty; the last bound when it lies above)."""
        n = self.count
        if n == 0:
            return None
        rank = q * n
        seen = 0
        for i, c in enumerate(self.counts):
            if c and seen + c >= rank:
                if i == len(self.bounds):
                    return self.bounds[-1]
                lo = self.bounds[i - 1] if i > 0 else 0.0
                return lo + (self.bounds[i] - lo) * (rank - seen) / c
            seen += c
        return self.bounds[-1]

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus buckets: (``le`` as text, cumulative count), ending with ``+Inf``."""
        out, running = [], 0
        for bound, c in zip([*map(str, self.bounds), "+Inf"], self.counts):
            running += c
            out.append((bound, running))
        return out

    def wire(self) -> list:
        return [*self.counts, round(self.total, 6)]


def from_wire(name: str, values: list) -> Histogram | None:
    """A histogram from a heartbeat's list (None when its bucket count does not match this version's bounds)."""
    bounds = BOUNDS.get(name)
    if bounds is None or len(values) != len(bounds) + 2:
        return None
    return Histogram(bounds, [int(v) for v in values[:-1]], float(values[-1]))


def merged(encoded: Iterable[str | None]) -> dict[str, Histogram]:
    """Sum the ``latency`` heartbeat fields of several workers (JSON text; missing or malformed ones skipped)."""
    out = {name: Histogram(bounds) for name, bounds in BOUNDS.items()}
    for text in encoded:
        if not text:
            continue
        try:
            parsed = json.loads(text)
        except ValueError:
            continue
        for name, values in parsed.items() if isinstance(parsed, dict) else ():
            h = from_wire(name, values) if isinstance(values, list) else None
            if h is not None:
                out[name].add(h)
    return out


class LatencyRecorder:
    """One verifier's histograms, observed as requests produce their first token and end."""

    def __init__(self) -> None:
        self.hists = {name: Histogram(bounds) for name, bounds in BOUNDS.items()}

    def observe(self, name: str, seconds: float) -> None:
        self.hists[name].observe(max(0.0, seconds))

    def wire(self) -> str:
        return json.dumps({name: h.wire() for name, h in self.hists.items()}, separators=(",", ":"))
