"""A snapshot of a deployment: workers with heartbeat ages, stream depths (lag + pending), dead letters and
the controller's current decision."""

from __future__ import annotations

import time

import redis

from cosine.broker import RedisSettings, Streams, connect, entry_ms
from cosine.keys import Keys
from cosine.markdown import table
from cosine.units import human_bytes


def _oldest_waiting_ms(r, stream: str, last_delivered) -> int | None:
    """The id time of the first entry after the group's last delivered one (None when nothing waits)."""
    start = last_delivered.decode() if isinstance(last_delivered, bytes) else str(last_delivered)
    rows = r.xrange(stream, f"({start}", "+", count=1)
    return entry_ms(rows[0][0]) if rows else None


def _group_depths(r, stream: str, now_ms: int) -> list[dict]:
    """Per consumer group of ``stream``: consumers, waiting (lag), pending, depth, the age of the oldest entry
    waiting and of the oldest pending (by their ids: time since they were added), entries acknowledged
    (entries read - pending, where Redis counts reads) and the stream's entries added ever."""
    try:
        groups = r.xinfo_groups(stream)
    except redis.ResponseError:  # no such stream yet
        return []
    added = None
    if groups:
        try:
            added = int(r.xinfo_stream(stream).get("entries-added", 0))
        except redis.ResponseError:
            pass
    out = []
    for g in groups:
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        lag = g.get("lag")
        pending = int(g.get("pending", 0))
        read = g.get("entries-read")
        oldest_pending = None
        if pending:
            summary = r.xpending(stream, name)
            if summary.get("min"):
                oldest_pending = entry_ms(summary["min"])
        oldest_waiting = _oldest_waiting_ms(r, stream, g.get("last-delivered-id", "0-0")) if lag != 0 else None
        out.append({
            "stream": stream,
            "group": name,
            "consumers": int(g.get("consumers", 0)),
            "pending": pending,
            "lag": None if lag is None else int(lag),
            "depth": pending + (int(lag) if lag is not None else int(r.xlen(stream))),
            "oldest_waiting_age_s": None if oldest_waiting is None else max(0.0, (now_ms - oldest_waiting) / 1000),
            "oldest_pending_age_s": None if oldest_pending is None else max(0.0, (now_ms - oldest_pending) / 1000),
            "acked": None if read is None else max(0, int(read) - pending),
            "entries_added": added,
        })
    return out


def control_timeline(r, keys: Keys, n: int) -> list[dict]:
    """The controller's last ``n`` decisions (starts, changes, stops; periodic samples left out), oldest first."""
    out: list[dict] = []
    for eid, fields in r.xrevrange(keys.control_log, count=max(1, 8 * n)):
        entry = {k.decode(): v.decode() for k, v in fields.items()}
        if entry.get("kind") == "sample":
            continue
        entry.pop("inputs", None)
        out.append({"id": eid.decode(), **entry})
        if len(out) >= n:
            break
    return out[::-1]


def collect_status(settings: RedisSettings, timeline: int = 0, r=None) -> dict:
    """The snapshot (``r``: a connection to reuse; default a new one)."""
    keys = Keys(settings.prefix)
    r = r if r is not None else connect(settings)
    streams = Streams(r, keys)
    now = streams.server_ms()  # heartbeats are stamped with the broker's clock
    workers = []
    for wid, score in r.zrange(keys.workers, 0, -1, withscores=True):
        info = {k.decode(): v.decode() for k, v in r.hgetall(keys.worker(wid.decode())).items()}
        if info.get("role") == "verifier":
            held = r.get(keys.inflight(wid.decode()))
            if held is not None:
                info["inflight"] = held.decode()
        workers.append({"id": wid.decode(), "heartbeat_age_s": round((now - score) / 1000, 2), **info})
    live = streams.live_workers()
    depths = _group_depths(r, keys.requests, now)
    for w in workers:
        if w.get("role") not in ("drafter", "verifier"):  # the controller has no stream of its own
            continue
        stream = keys.draft(w["id"]) if w.get("role") == "drafter" else keys.verify(w["id"])
        depths += _group_depths(r, stream, now)
    control = None
    raw = r.hgetall(keys.control)
    if raw:
        control = {k.decode(): v.decode() for k, v in raw.items()}
        try:
            control["age_s"] = round((now - int(control.get("at_ms", "0"))) / 1000, 1)
        except ValueError:
            pass
    return {
        "redis": settings.describe(),
        "prefix": settings.prefix,
        "now_ms": now,
        "workers": [{**w, "alive": w["id"] in live} for w in workers],
        "streams": depths,
        "dead_letters": int(r.xlen(keys.dlq)) if r.exists(keys.dlq) else 0,
        "control": control,
        "timeline": control_timeline(r, keys, timeline) if timeline > 0 else [],
    }


def format_control(control: dict | None) -> str:
    if not control:
        return "control: no decision published (no controller has run; workers use their own settings)"
    c = control
    age = f", decided {c['age_s']} s ago" if "age_s" in c else ""
    by = f" by {c['controller']}" if c.get("controller") else ""
    return (f"control v{c.get('version', '?')}{by}{age}: k {c.get('k_min', '?')}..{c.get('k_max', '?')}, "
            f"cooperating drafters <= {c.get('max_cooperating', '?')}, verifier batch <= "
            f"{c.get('verifier_max_batch', '?')} ({c.get('verifier_token_cap', '?')} tokens), pressure "
            f"{c.get('pressure', '?')}\n  reason: {c.get('reason', '')}")


def format_memory(w: dict) -> list[str]:
    """A worker's memory columns: KV cache now and at its peak, the KV budget (token slots; "none"), the
    process's peak RSS and torch's CUDA peak, in binary units ('' where the worker does not say)."""
    budget = w.get("kv_capacity_tokens")
    budget = "" if budget is None else "none" if budget == "" else f"{budget} slots"
    return [human_bytes(w.get("kv_bytes")), human_bytes(w.get("kv_peak_bytes")), budget,
            human_bytes(w.get("rss_peak_bytes")), human_bytes(w.get("cuda_peak_bytes"))]


def format_status(snap: dict) -> str:
    workers = table(
        ["worker", "role", "alive", "heartbeat age (s)", "active", "busy", "experts", "kv", "kv peak",
         "kv budget", "rss peak", "cuda peak"],
        [[w["id"], w.get("role", "?"), "yes" if w["alive"] else "NO", w["heartbeat_age_s"], w.get("active", ""),
          w.get("busy", ""), w.get("experts", ""), *format_memory(w)] for w in snap["workers"]],
    )
    streams = table(
        ["stream", "group", "consumers", "lag", "pending", "depth"],
        [[s["stream"], s["group"], s["consumers"], "null" if s["lag"] is None else s["lag"], s["pending"],
          s["depth"]] for s in snap["streams"]],
    )
    return (f"Redis {snap['redis']} (prefix {snap['prefix']})\n\n{workers}\n\n{streams}\n\n"
            f"dead letters: {snap['dead_letters']}\n{format_control(snap.get('control'))}")


def format_timeline(snap: dict) -> str:
    rows = snap.get("timeline") or []
    if not rows:
        return ""
    body = table(
        ["time", "kind", "version", "k", "cooperating", "batch", "pressure", "reason"],
        [[time.strftime("%H:%M:%S", time.localtime(entry_ms(e["id"]) / 1000)), e.get("kind", ""),
          e.get("version", ""), f"{e.get('k_min', '?')}..{e.get('k_max', '?')}", e.get("max_cooperating", ""),
          e.get("verifier_max_batch", ""), e.get("pressure", ""), e.get("reason", "")] for e in rows],
    )
    return f"\n\ncontroller timeline\n\n{body}"
