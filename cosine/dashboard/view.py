"""What the dashboard page shows, computed from status snapshots: a pure function of the latest snapshot and
the ones before it (rates need two), so it is tested without Redis or a browser.

A :class:`Sample` is what one snapshot says in numbers (the workers' cumulative counters summed, each stream
group's added and acknowledged counts, the merged latency histograms); :func:`build_view` turns the latest
snapshot and the samples kept into the page's state: panels (streams, workers, speculation, requests,
controller) and the time series the charts draw.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field

from cosine.broker import entry_ms
from cosine.histogram import Histogram, merged

RATE_WINDOW_S = 5.0  # rates (per second) are measured over about this long
LATENCY_WINDOW_S = 60.0  # the "recent" latency percentiles cover about this long
SERIES_POINTS = 300  # points kept per chart (5 minutes at one sample a second)
INFLIGHT_SHOWN = 20
QUANTILES = (0.5, 0.9, 0.99)

# Verifier counters summed over the deployment (the heartbeat's names).
SUMMED = ("output_tokens", "completed", "spec_drafts", "spec_draft_tokens", "spec_accepted_tokens", "plain_steps",
          "stale_drafts", "late_drafts", "resyncs", "lookahead_hits", "passes", "rejected", "dead_lettered")


def num(value, default: float = 0.0) -> float:
    """A heartbeat value (a string) as a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _json(value, default):
    try:
        out = json.loads(value) if isinstance(value, str) else default
    except ValueError:
        return default
    return out if isinstance(out, type(default)) else default


@dataclass
class Sample:
    """One snapshot in numbers, for rates between two of them."""

    t: float  # seconds, by the broker's clock
    totals: dict[str, float]
    workers: dict[str, dict[str, float]]  # worker id -> its counters used for rates
    groups: dict[str, tuple[float | None, float | None]]  # "stream|group" -> (entries added, acked)
    latency: dict[str, Histogram]

    @classmethod
    def of(cls, snap: dict) -> Sample:
        verifiers = [w for w in snap["workers"] if w.get("role") == "verifier"]
        workers = {w["id"]: {k: num(w.get(k)) for k in ("passes", "batches", "jobs", "busy_s", "blocked_s",
                                                          "spec_drafts", "plain_steps")} for w in snap["workers"]}
        return cls(
            t=snap["now_ms"] / 1000,
            totals={k: sum(num(w.get(k)) for w in verifiers) for k in SUMMED},
            workers=workers,
            groups={f"{s['stream']}|{s['group']}": (s.get("entries_added"), s.get("acked")) for s in snap["streams"]},
            latency=merged(w.get("latency") for w in verifiers),
        )


@dataclass
class History:
    """The samples of the last few minutes and the chart series built from them."""

    samples: deque = field(default_factory=lambda: deque(maxlen=SERIES_POINTS))
    series: deque = field(default_factory=lambda: deque(maxlen=SERIES_POINTS))

    def before(self, now: float, window: float) -> Sample | None:
        """The newest sample at least ``window`` seconds older than ``now`` (else the oldest there is)."""
        found = None
        for s in self.samples:
            if now - s.t >= window:
                found = s
            else:
                break
        if found is None and self.samples and self.samples[0].t < now:
            found = self.samples[0]
        return found


def _rate(new: float | None, old: float | None, dt: float) -> float | None:
    if new is None or old is None or dt <= 0:
        return None
    return max(0.0, (new - old) / dt)  # a restarted worker's counters start again: no negative rates


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _streams(snap: dict, now: Sample, old: Sample | None) -> list[dict]:
    out = []
    for s in snap["streams"]:
        key = f"{s['stream']}|{s['group']}"
        dt = now.t - old.t if old else 0.0
        added, acked = now.groups[key]
        was = old.groups.get(key, (None, None)) if old else (None, None)
        out.append({**s, "enqueue_rate": _rate(added, was[0], dt), "ack_rate": _rate(acked, was[1], dt)})
    return out


def _workers(snap: dict, now: Sample, old: Sample | None) -> list[dict]:
    out = []
    for w in snap["workers"]:
        mine, was = now.workers[w["id"]], (old.workers.get(w["id"]) if old else None)
        dt = now.t - old.t if old else 0.0
        role = w.get("role", "?")
        row = {"id": w["id"], "role": role, "alive": w["alive"], "heartbeat_age_s": w["heartbeat_age_s"],
               "models": w.get("experts") or w.get("model") or "", "active": num(w.get("active"), None)}
        passes, items = ("passes", None) if role == "verifier" else ("batches", "jobs")
        if role not in ("verifier", "drafter"):
            row["active"] = None  # a controller holds no requests and runs no passes
        elif was is not None and dt > 0:
            d_pass = mine[passes] - was[passes]
            row["passes_per_s"] = max(0.0, d_pass / dt)
            if role == "verifier":
                rounds = (mine["spec_drafts"] + mine["plain_steps"]) - (was["spec_drafts"] + was["plain_steps"])
                row["batch"] = _ratio(rounds, d_pass)
                row["blocked"] = max(0.0, min(1.0, (mine["blocked_s"] - was["blocked_s"]) / dt))
            elif items:
                row["batch"] = _ratio(mine[items] - was[items], d_pass)
            row["busy"] = max(0.0, min(1.0, (mine["busy_s"] - was["busy_s"]) / dt))
        else:
            row["busy"] = num(w.get("busy"), None)
        out.append(row)
    return out


def _speculation(snap: dict, now: Sample, recent: Sample | None) -> dict:
    tot = now.totals
    verifiers = [w for w in snap["workers"] if w.get("role") == "verifier"]
    drafters = [w for w in snap["workers"] if w.get("role") == "drafter"]
    by: dict[str, dict[str, list[float]]] = {"drafter": {}, "domain": {}}
    positions: dict[int, float] = {}
    for w in verifiers:
        spec_by = _json(w.get("spec_by"), {})
        for kind in by:
            for name, tally in (spec_by.get(kind) or {}).items():
                acc = by[kind].setdefault(name, [0, 0, 0])
                for i in range(3):
                    acc[i] += num(tally[i] if i < len(tally) else 0)
        for key, value in w.items():
            if key.startswith("spec_accepted_pos_"):
                pos = int(key.rsplit("_", 1)[1])
                positions[pos] = positions.get(pos, 0.0) + num(value)

    def summary(drafts, tokens, accepted) -> dict:
        return {"drafts": drafts, "draft_tokens": tokens, "accepted": accepted,
                "acceptance_rate": _ratio(accepted, tokens),
                "mean_acceptance_length": None if not drafts else 1 + accepted / drafts}

    hits = sum(num(w.get("lookahead_hits")) for w in drafters)
    misses = sum(num(w.get("lookahead_misses")) for w in drafters)
    control = snap.get("control") or {}
    window = None
    if recent is not None:
        window = summary(*(tot[k] - recent.totals[k] for k in ("spec_drafts", "spec_draft_tokens",
                                                                "spec_accepted_tokens")))
    return {
        "overall": summary(tot["spec_drafts"], tot["spec_draft_tokens"], tot["spec_accepted_tokens"]),
        "recent": window,
        "by_drafter": {n: summary(*t) for n, t in sorted(by["drafter"].items())},
        "by_domain": {n: summary(*t) for n, t in sorted(by["domain"].items())},
        "per_position": [{"position": p, "accepted": positions[p],
                          "rate": _ratio(positions[p], tot["spec_drafts"])} for p in sorted(positions)],
        "k": f"{control.get('k_min', '?')}..{control.get('k_max', '?')}" if control else None,
        "cooperating": control.get("max_cooperating"),
        "stale_drafts": tot["stale_drafts"], "late_drafts": tot["late_drafts"], "fallback_steps": tot["plain_steps"],
        "resyncs": tot["resyncs"], "lookahead_hit_rate": _ratio(hits, hits + misses),
    }


def _percentiles(h: Histogram) -> dict:
    return {"count": h.count, **{f"p{round(q * 100)}": h.quantile(q) for q in QUANTILES}}


def _requests(snap: dict, now: Sample, old: Sample | None, recent: Sample | None) -> dict:
    dt = now.t - old.t if old else 0.0
    inflight = []
    for w in snap["workers"]:
        if w.get("role") == "verifier" and w["alive"]:
            inflight += [{**r, "verifier": w["id"]} for r in _json(w.get("inflight"), [])]
    inflight.sort(key=lambda r: -num(r.get("age_s")))
    latency = {}
    for name, h in now.latency.items():
        windowed = None
        if recent is not None:
            windowed = Histogram(h.bounds, [max(0, a - b) for a, b in zip(h.counts, recent.latency[name].counts)],
                                 max(0.0, h.total - recent.latency[name].total))
        latency[name] = {"all": _percentiles(h), "recent": _percentiles(windowed) if windowed else None}
    pending = [s for s in snap["streams"] if s["stream"].endswith(":requests")]
    return {
        "tokens_per_s": _rate(now.totals["output_tokens"], old.totals["output_tokens"] if old else None, dt),
        "requests_per_s": _rate(now.totals["completed"], old.totals["completed"] if old else None, dt),
        "completed": now.totals["completed"],
        "in_flight": sum(s["pending"] for s in pending),
        "queued": sum(s["lag"] or 0 for s in pending),
        "inflight": inflight[:INFLIGHT_SHOWN],
        "latency": latency,
    }


def _series_point(snap: dict, streams: list[dict], requests: dict, spec: dict) -> dict:
    def depth(kind: str, field: str) -> float:
        return sum((s.get(field) or 0) for s in streams if f":{kind}" in s["stream"])

    control = snap.get("control") or {}
    recent = spec["recent"] or {}
    return {"t": snap["now_ms"] / 1000, "requests_waiting": depth("requests", "lag"),
            "requests_pending": depth("requests", "pending"), "draft_depth": depth("draft:", "depth"),
            "verify_depth": depth("verify:", "depth"), "tokens_per_s": requests["tokens_per_s"],
            "requests_per_s": requests["requests_per_s"], "acceptance_rate": recent.get("acceptance_rate"),
            "k_max": num(control.get("k_max"), None), "cooperating": num(control.get("max_cooperating"), None)}


def build_view(snap: dict, dead_letters: list[dict], history: History) -> dict:
    """The page's state for ``snap`` (a :func:`cosine.status.collect_status` snapshot with a timeline), the
    latest dead letters, and ``history`` (updated: this snapshot's sample and series point are appended)."""
    now = Sample.of(snap)
    old = history.before(now.t, RATE_WINDOW_S)
    recent = history.before(now.t, LATENCY_WINDOW_S)
    streams = _streams(snap, now, old)
    spec = _speculation(snap, now, old)
    requests = _requests(snap, now, old, recent)
    history.samples.append(now)
    history.series.append(_series_point(snap, streams, requests, spec))
    decisions = [{"t": entry_ms(e["id"]) / 1000, **{k: e.get(k) for k in (
        "kind", "version", "k_min", "k_max", "max_cooperating", "verifier_max_batch", "pressure", "reason")}}
        for e in snap.get("timeline", [])]
    return {
        "redis_up": True,
        "redis": snap["redis"], "prefix": snap["prefix"], "now": now.t,
        "streams": streams,
        "dead_letters": {"count": snap["dead_letters"], "latest": dead_letters},
        "workers": _workers(snap, now, old),
        "speculation": spec,
        "requests": requests,
        "control": snap.get("control"),
        "decisions": decisions,
        "series": list(history.series),
    }
