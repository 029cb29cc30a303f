"""A snapshot of a deployment: workers with heartbeat ages, stream depths (lag + pending), dead letters."""

from __future__ import annotations

import time

from cosine.broker import RedisSettings, Streams, connect
from cosine.keys import Keys
from cosine.markdown import table


def _group_depths(r, stream: str) -> list[dict]:
    try:
        groups = r.xinfo_groups(stream)
    except Exception:  # no such stream yet
        return []
    out = []
    for g in groups:
        lag = g.get("lag")
        pending = int(g.get("pending", 0))
        out.append({
            "stream": stream,
            "group": g["name"].decode() if isinstance(g["name"], bytes) else g["name"],
            "consumers": int(g.get("consumers", 0)),
            "pending": pending,
            "lag": None if lag is None else int(lag),
            "depth": pending + (int(lag) if lag is not None else int(r.xlen(stream))),
        })
    return out


def collect_status(settings: RedisSettings) -> dict:
    keys = Keys(settings.prefix)
    r = connect(settings)
    streams = Streams(r, keys)
    now = time.time() * 1000
    workers = []
    for wid, score in r.zrange(keys.workers, 0, -1, withscores=True):
        info = {k.decode(): v.decode() for k, v in r.hgetall(keys.worker(wid.decode())).items()}
        workers.append({"id": wid.decode(), "heartbeat_age_s": round((now - score) / 1000, 2), **info})
    live = streams.live_workers()
    depths = _group_depths(r, keys.requests)
    for w in workers:
        stream = keys.draft(w["id"]) if w.get("role") == "drafter" else keys.verify(w["id"])
        depths += _group_depths(r, stream)
    return {
        "redis": settings.url if not settings.sentinels else f"sentinel {settings.sentinels}",
        "prefix": settings.prefix,
        "workers": [{**w, "alive": w["id"] in live} for w in workers],
        "streams": depths,
        "dead_letters": int(r.xlen(keys.dlq)) if r.exists(keys.dlq) else 0,
    }


def format_status(snap: dict) -> str:
    workers = table(
        ["worker", "role", "alive", "heartbeat age (s)", "active", "busy", "experts"],
        [[w["id"], w.get("role", "?"), "yes" if w["alive"] else "NO", w["heartbeat_age_s"], w.get("active", ""),
          w.get("busy", ""), w.get("experts", "")] for w in snap["workers"]],
    )
    streams = table(
        ["stream", "group", "consumers", "lag", "pending", "depth"],
        [[s["stream"], s["group"], s["consumers"], "null" if s["lag"] is None else s["lag"], s["pending"],
          s["depth"]] for s in snap["streams"]],
    )
    return (f"Redis {snap['redis']} (prefix {snap['prefix']})\n\n{workers}\n\n{streams}\n\n"
            f"dead letters: {snap['dead_letters']}")
