"""CoSine against what a user would run instead, per view: ratios, the targets of issue 21, the physical limit.

Rows of both benchmarks are looked up by ``(system, workload)``; a baseline's system name carries its view
(:func:`hf_name`), since the same baseline runs on different cores in each. ``hf-generate`` and
``hf-assisted`` serve one request at a time, so they run once, under ``closed c=1``; ``hf-batched`` runs at
every other concurrency. The target comparisons alternate the two systems in repeats where the benchmark
ran them (:mod:`cosine.bench.repeats`), and use the pooled numbers; else the sweep's cells.

The physical limit of a pipeline row is its mean acceptance length x HF's decode rate on the verifier's
cores (1 / HF ``generate``'s per-token latency at batch 1): every verify pass costing one decode step, and
drafting wholly hidden behind it. A row's distance from it is its per-request decode rate (1 / its per-token
latency p50) over the limit; at c=1 that is the issue's limit.
"""

from __future__ import annotations

from collections.abc import Collection

from cosine.bench.pinning import EQUAL, NODE
from cosine.bench.repeats import INTERVAL_LEVEL, cell_value, pooled_by_pair, ratio, ratio_interval
from cosine.markdown import table

C1 = "closed c=1"

# key -> (view, concurrency, baseline, goal): the targets for CoSine / the baseline's throughput.
TARGETS = {
    "node_c1_vs_hf_generate": (NODE, 1, "hf-generate", 1.5),
    "node_c1_vs_hf_assisted": (NODE, 1, "hf-assisted", 1.2),
    "node_c8_vs_hf_batched": (NODE, 8, "hf-batched", 1.2),
    "equal_c1_vs_hf_generate": (EQUAL, 1, "hf-generate", 1.2),
    "equal_c8_vs_hf_batched": (EQUAL, 8, "hf-batched", 1.0),
}
BLOCKED_GOAL = 0.10  # the verifier blocked on drafts at c=1, share of its time


def hf_name(path: str, view: str) -> str:
    return f"{path} ({view})"


def closed(c: int) -> str:
    return f"closed c={c}"


def baseline_cell(path: str, view: str, c: int) -> tuple[str, str]:
    """Where a baseline's row for concurrency ``c`` lives: (system, workload)."""
    return hf_name(path, view), (closed(c) if path == "hf-batched" else C1)


def rivals(results: list[dict], cosine: str, views: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """The ``(workload, system, rival)`` pairs of the targets whose two rows the sweep has: to repeat."""
    pairs = []
    for view, c, path, _ in TARGETS.values():
        system, workload = baseline_cell(path, view, c)
        if view in views and cell_value(results, cosine, workload, "tokens") and cell_value(results, system, workload, "tokens"):
            pairs.append((workload, cosine, system))
    return pairs


def _pair(results, repeats, system, rival, workload) -> tuple[float | None, float | None, int]:
    """Both systems' throughput on ``workload``: pooled repeats where both have them, else the sweep's cells."""
    pools = pooled_by_pair(repeats or [])
    if (system, workload) in pools and (rival, workload) in pools:
        a, b = pools[(system, workload)], pools[(rival, workload)]
        return a["throughput_tok_s"], b["throughput_tok_s"], a["runs"]
    return (cell_value(results, system, workload, "throughput_tok_s"),
            cell_value(results, rival, workload, "throughput_tok_s"), 0)


def _interval(repeats, system, rival, workload) -> str:
    rows = [r for r in repeats or [] if r["workload"] == workload]
    iv = ratio_interval([r for r in rows if r["system"] == system], [r for r in rows if r["system"] == rival],
                        ("throughput_tok_s",))
    return "—" if not iv else "{:.2f}–{:.2f}".format(*iv["throughput_tok_s"])


def blocked_share(results: list[dict], repeats: list[dict] | None, cosine: str, workload: str = C1):
    """The verifier's share of time blocked on drafts: over the repeats weighted by wall time, else the
    sweep's cell; with the number of runs behind it."""
    def of(rows: list[dict]) -> list[dict]:
        return [r for r in rows if r["system"] == cosine and r["workload"] == workload and r.get("verifier_pass")]

    repeated = of(repeats or [])
    rows, runs = (repeated, len(repeated)) if repeated else (of(results), 0)
    wall = sum(r["wall_s"] for r in rows)
    if not wall:
        return None, 0
    return round(sum(r["verifier_pass"]["blocked_on_drafts"] * r["wall_s"] for r in rows) / wall, 4), runs


def hf_targets(results: list[dict], repeats: list[dict] | None, cosine: str, views: tuple[str, ...]) -> dict:
    """The issue's targets against the baselines, each with its view, the runs behind it and the bootstrap
    interval of the pooled ratio over the repeats."""
    out: dict[str, dict] = {}
    for key, (view, c, path, goal) in TARGETS.items():
        if view not in views:
            continue
        rival, workload = baseline_cell(path, view, c)
        a, b, runs = _pair(results, repeats, cosine, rival, workload)
        v = ratio(a, b)
        if v is None:
            continue
        how = f"{runs} alternated runs each, pooled" if runs else "the sweep's cells"
        out[key] = {"value": v, "target": goal, "met": v >= goal, "view": view,
                    "what": f"{view}: throughput at c={c}, CoSine / {rival} ({how})",
                    "interval": _interval(repeats, cosine, rival, workload)}
    share, runs = blocked_share(results, repeats, cosine)
    if share is not None:
        view = NODE if NODE in views else "unpinned"
        how = f"{runs} alternated runs, wall-weighted" if runs else "the sweep's cell"
        out["verifier_blocked_c1"] = {"value": share, "target": BLOCKED_GOAL, "met": share <= BLOCKED_GOAL,
                                      "view": view, "what": f"{view}: verifier blocked on drafts at c=1, share of "
                                                            f"wall time ({how})", "interval": "—"}
    return out


def versus(results: list[dict], cosine: str, views: tuple[str, ...], concurrency: tuple[int, ...]) -> dict:
    """The sweep's ratios, per view and concurrency: CoSine / HF generate (batch 1), / HF batched at the
    same concurrency, and / HF assisted at c=1."""
    out: dict[str, dict] = {}
    for view in views:
        for c in concurrency:
            mine = cell_value(results, cosine, closed(c), "throughput_tok_s")
            cells = {path: cell_value(results, *baseline_cell(path, view, c), "throughput_tok_s")
                     for path in ("hf-generate", "hf-batched", "hf-assisted")
                     if (path != "hf-batched" or c > 1) and (path != "hf-assisted" or c == 1)}
            ratios = {path: ratio(mine, tp) for path, tp in cells.items()}
            if mine and any(ratios.values()):
                out.setdefault(view, {})[closed(c)] = {"tok_s": mine, **{f"vs {p}": r for p, r in ratios.items()}}
    return out


def add_limits(results: list[dict], pipelines: Collection[str], views: tuple[str, ...]) -> dict | None:
    """Put the physical limit (see the module's docstring) in every row of the ``pipelines`` systems; returns
    where the HF decode rate came from, or None without an HF ``generate`` row."""
    view = NODE if NODE in views else EQUAL
    tpot = cell_value(results, hf_name("hf-generate", view), C1, "tpot_p50_ms")
    if not tpot:
        return None
    rate = 1000 / tpot
    for r in results:
        if r["system"] in pipelines and r.get("mean_acceptance_length") and r.get("tpot_p50_ms"):
            limit = r["mean_acceptance_length"] * rate
            per_request = 1000 / r["tpot_p50_ms"]
            r["limit"] = {"tok_s": round(limit, 1), "per_request_tok_s": round(per_request, 1),
                          "of_limit": round(per_request / limit, 3)}
    return {"hf_decode_tok_s": round(rate, 1), "from": hf_name("hf-generate", view)}


def versus_markdown(ratios: dict) -> str:
    """One table per view: CoSine's throughput and its ratio to each baseline."""
    parts = []
    for view, by_workload in ratios.items():
        body = [[w, f"{v['tok_s']:.0f}", *(("—" if v.get(f"vs {p}") is None else f"{v[f'vs {p}']:.2f}x")
                                           for p in ("hf-generate", "hf-batched", "hf-assisted"))]
                for w, v in by_workload.items()]
        parts.append(f"CoSine against Hugging Face, **{view}** (baselines on {_cores(view)}; the sweep's cells, "
                     f"the targets below use the alternated repeats where there are any)\n\n"
                     + table(["workload", "CoSine tokens/s", "× HF generate (batch 1)", "× HF batched (same c)",
                              "× HF assisted (batch 1)"], body))
    return "\n\n".join(parts)


def _cores(view: str) -> str:
    return "the verifier's cores" if view == NODE else "every core the deployment uses"


def targets_markdown(targets: dict) -> str:
    return table(["target", "what", "measured", f"{INTERVAL_LEVEL:.0%} interval over the repeats", "goal", "met"],
                 [[k, v.get("what", "—"), v["value"], v.get("interval", "—"), v["target"],
                   "yes" if v["met"] else "**no**"] for k, v in targets.items()])


def _num(x, fmt: str) -> str:
    return "—" if x is None else fmt.format(x)


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def breakdown_markdown(rows: list[dict], label: str = "workload") -> str:
    """Per pipeline row: where the verifier's wall time went, its forward per verify pass (prefills apart: set
it against HF's per-token latency), and how far the row is from its limit."""
    body = []
    for r in rows:
        p, lim = r.get("verifier_pass") or {}, r.get("limit") or {}
        overhead = _pct(p.get("overhead")) + (f" (prefill {_pct(p['prefill'])})" if p.get("prefill") else "")
        body.append([r[label], *(_pct(p.get(k)) for k in ("forward", "blocked_on_drafts", "messaging")), overhead,
                     _pct(p.get("idle")),
                     _num(r.get("forward_ms_per_pass"), "{:.1f}"), _num(r.get("mean_acceptance_length"), "{:.2f}"),
                     lim.get("tok_s", "—"), lim.get("per_request_tok_s", "—"), _pct(lim.get("of_limit"))])
    return table([label, "forward", "blocked on drafts", "messaging", "overhead (of it prefill)", "idle",
                  "forward ms / pass",
                  "mean acceptance length", "limit (tokens/s)", "per request (tokens/s)", "of limit"], body)


def breakdown_cell(row: dict) -> str:
    """A compact ``forward / blocked / messaging / overhead`` cell (percent of wall time)."""
    p = row.get("verifier_pass")
    if not p:
        return "—"
    return " / ".join(f"{100 * p[k]:.0f}" for k in ("forward", "blocked_on_drafts", "messaging", "overhead"))
