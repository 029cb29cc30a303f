"""Head-to-head repeats: the comparisons a drift of the machine can tip, measured again, alternated.

An ablation sweep runs its systems one after another for about half an hour, and a shared machine's speed
drifts over that time (here a single-thread matmul timed between runs took 114-176 µs): the system run
first and the one run near the end meet different machines. Two full sweeps of the same code put CoSine
at concurrency 8 at 1.69x and at 1.28x plain DSD. So after the sweep each such target's two systems run
its workload again, ``repeats`` times each, alternated A B, B A, A B ... on fresh deployments, so that a
drift hits both alike; open-loop repeats draw new arrivals per repeat, the same draws for both systems.
Adaptive control is repeated against the sweep's two best fixed lengths, not its one best: a single cell
picks among lengths that differ by less than the draws do (one sweep picked k=6, whose repeats adaptive
control won, while a separate head-to-head against k=4, second in that sweep, went k=4's way), so the three
systems alternate together (A B C, C B A, ...) and the target must hold against both. The targets are
computed from these runs, pooled: tokens over wall time summed, percentiles over every request of every
repeat. How far the draws alone move a pooled ratio is shown by a bootstrap over the repeats
(:func:`ratio_interval`): three sets of the same code once put adaptive control's pooled p99 at 0.88x,
1.15x and 0.95x the fixed length's, so a ratio near 1 says little without its interval.

Standard library only (the cluster simulation uses the same pooling).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from cosine.bench.timing import percentile
from cosine.errors import InvalidParameterError
from cosine.markdown import table

FIXED_K = ("no-adaptive", "fixed-k2", "fixed-k6", "fixed-k8")  # the fixed speculation lengths adaptive must beat
FIXED_RIVALS = 2  # adaptive control is repeated against this many of them: the sweep's lowest p99s
C8, FLUCTUATING = "closed c=8", "poisson fluctuating"


def cell_value(results: list[dict], system: str, workload: str, key: str):
    """One field of one (system, workload) row of a sweep's results; None when there is no such row."""
    return next((r.get(key) for r in results if r["system"] == system and r["workload"] == workload), None)


def rivals(results: list[dict]) -> list[tuple[str, str, str]]:
    """The ``(workload, system, rival)`` pairs to repeat, from the sweep's ``results``: CoSine against plain
    DSD at concurrency 8, and CoSine against each of the ``FIXED_RIVALS`` fixed lengths with the sweep's lowest
    p99 under fluctuating load, lowest first (the sweep's picks; the repeats then measure them afresh, free of
    the luck that ranked them)."""
    pairs = []
    if cell_value(results, "cosine", C8, "tokens") and cell_value(results, "plain-dsd", C8, "tokens"):
        pairs.append((C8, "cosine", "plain-dsd"))
    fixed = [n for n in FIXED_K if cell_value(results, n, FLUCTUATING, "tpot_p99_ms")]
    if fixed and cell_value(results, "cosine", FLUCTUATING, "tokens"):
        best = sorted(fixed, key=lambda n: cell_value(results, n, FLUCTUATING, "tpot_p99_ms"))[:FIXED_RIVALS]
        pairs += [(FLUCTUATING, "cosine", rival) for rival in best]
    return pairs


def alternated(systems: list[str], repeats: int) -> list[tuple[int, str]]:
    """``(repeat, system)`` in run order: A B C, C B A, A B C, ..."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 0:
        raise InvalidParameterError("repeats", f"must be an integer >= 0, got {repeats!r}")
    return [(r, s) for r in range(repeats) for s in (systems if r % 2 == 0 else systems[::-1])]


def run_repeats(pairs: list[tuple[str, str, str]], repeats: int,
                measure: Callable[[str, str, int], dict], bar=None) -> list[dict]:
    """Run the systems of every workload's pairs alternated together (a system in several pairs of one
    workload runs once per repeat, and each of its runs counts for every pair); ``measure(system, workload,
    repeat)`` returns one run's row (with ``tokens``, ``wall_s`` and ``tpots_ms``). ``bar``: a tqdm progress
    bar the runs are added to. Returns the rows, each marked with its system, workload and repeat."""
    groups: dict[str, list[str]] = {}
    for workload, a, b in pairs:
        group = groups.setdefault(workload, [])
        group += [s for s in (a, b) if s not in group]
    if bar is not None:
        bar.total += repeats * sum(len(group) for group in groups.values())
    rows = []
    for workload, group in groups.items():
        for r, system in alternated(group, repeats):
            if bar is not None:
                bar.set_postfix_str(f"repeat {r + 1}/{repeats} {system}: {workload}")
            rows.append({"system": system, "workload": workload, "repeat": r, **measure(system, workload, r)})
            if bar is not None:
                bar.update(1)
    return rows


def pooled(rows: list[dict]) -> dict:
    """One system's repeats of one workload as one sample: throughput = tokens / wall time, both summed
    (not a mean of ratios), and per-token latency percentiles over every request of every run."""
    tokens = sum(r["tokens"] for r in rows)
    wall = sum(r["wall_s"] for r in rows)
    tpots = [t for r in rows for t in r.get("tpots_ms") or []]
    p50, p99 = percentile(tpots, 0.5), percentile(tpots, 0.99)
    return {
        "runs": len(rows),
        "requests": sum(r["requests"] for r in rows),
        "throughput_tok_s": round(tokens / wall, 2) if wall else 0.0,
        "runs_tok_s": [r["throughput_tok_s"] for r in rows],
        "tpot_p50_ms": None if p50 is None else round(p50, 2),
        "tpot_p99_ms": None if p99 is None else round(p99, 2),
        "runs_p99_ms": [r["tpot_p99_ms"] for r in rows],
    }


def pooled_by_pair(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """``(system, workload)`` -> :func:`pooled` over its repeats."""
    keys = list(dict.fromkeys((r["system"], r["workload"]) for r in rows))
    return {k: pooled([r for r in rows if (r["system"], r["workload"]) == k]) for k in keys}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b and math.isfinite(a) and math.isfinite(b) else None


INTERVAL_LEVEL = 0.9  # the bootstrap interval's coverage
INTERVAL_DRAWS = 2000  # bootstrap resamples (fixed seed: the same rows give the same interval)


def ratio_interval(a_rows: list[dict], b_rows: list[dict], keys: tuple[str, ...] = ("throughput_tok_s", "tpot_p99_ms"),
                   level: float = INTERVAL_LEVEL, draws: int = INTERVAL_DRAWS,
                   seed: int = 0) -> dict[str, tuple[float, float]] | None:
    """A percentile-bootstrap interval of ``pooled(a)[key] / pooled(b)[key]`` for each key, over the repeats.

    Each draw takes repeat numbers with replacement, the same ones for both systems (repeat ``r`` of A and
    of B met the same arrivals and the same stretch of the machine's drift), and pools those runs of each.
    None with fewer than two repeats both systems ran. With five repeats the interval is rough (a percentile
    bootstrap of few samples is too narrow, if anything); it shows the scale of the draws' noise, not a test.
    """
    if not 0 < level < 1:
        raise InvalidParameterError("level", f"must be strictly between 0 and 1, got {level!r}")
    a_by, b_by = {r["repeat"]: r for r in a_rows}, {r["repeat"]: r for r in b_rows}
    both = sorted(set(a_by) & set(b_by))
    if len(both) < 2:
        return None
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(draws):
        pick = [rng.choice(both) for _ in both]
        pa, pb = pooled([a_by[r] for r in pick]), pooled([b_by[r] for r in pick])
        for k in keys:
            v = ratio(pa[k], pb[k])
            if v is not None:
                samples[k].append(v)
    tail = (1 - level) / 2
    out = {}
    for k, vals in samples.items():
        if vals:
            vals.sort()
            out[k] = (vals[int(tail * (len(vals) - 1))], vals[int(math.ceil((1 - tail) * (len(vals) - 1)))])
    return out


ON_FRESH_DEPLOYMENTS = "on fresh deployments, new arrivals per open-loop repeat, the same for both"


def repeats_markdown(rows: list[dict], how: str = ON_FRESH_DEPLOYMENTS) -> str:
    """The head-to-head repeats: each run's throughput and p99, and the pooled numbers the targets use; ``how``
    says how the systems alternated."""
    body = [[w, s, str(p["runs"]), ", ".join(f"{v:.0f}" for v in p["runs_tok_s"]), f"{p['throughput_tok_s']:.0f}",
             ", ".join("—" if v is None else f"{v:.0f}" for v in p["runs_p99_ms"]),
             f"{p['tpot_p50_ms']:.0f} / {p['tpot_p99_ms']:.0f}" if p["tpot_p99_ms"] is not None else "—"]
            for (s, w), p in pooled_by_pair(rows).items()]
    return (f"Head-to-head repeats (after the sweep; a workload's systems alternated {how})\n\n"
            + table(["workload", "system", "runs", "tokens/s per run", "tokens/s pooled", "p99 per run (ms)",
                     "p50 / p99 pooled (ms)"], body))
