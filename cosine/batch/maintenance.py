"""Periodic upkeep of a deployment's streams that no worker does for itself, run from Celery beat.

* :func:`dead_letter_report`: what the dead-letter stream holds, counted by reason and by source stream.
* :func:`stale_consumers`: consumers of the ``verifiers`` / ``drafters`` groups idle past a threshold whose worker
  has no live heartbeat. Their pending admission entries are claimed for a live verifier (its stray sweep admits
  them, as after a lost read), their pending draft jobs and drafts (hints to a dead worker) are acked away, then
  the consumer is deleted. Workers registered but long silent are left to :meth:`Streams.forget_dead_workers`.
* :func:`orphan_streams`: per-worker streams (``draft:``, ``verify:``, ``ask:``, ``votes:``) of workers with no
  registration at all, e.g. left by a worker that stopped cleanly (it unregisters, its streams stay).

Each runs under a ``SET NX PX`` guard of its own, so two beats never run the same sweep at once. They read and
write ``{prefix}:*`` keys: they connect as the ``cosine-maintenance`` ACL user, never as ``cosine-celery``.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter

from redis.exceptions import ResponseError

from cosine import defaults
from cosine.broker import Streams
from cosine.keys import DRAFTERS_GROUP, VERIFIERS_GROUP

log = logging.getLogger(__name__)

PER_WORKER_KINDS = ("draft", "verify", "ask", "votes")
GUARD_MS = 10_000  # a sweep holds its lock this long: longer than one sweep takes, shorter than the beat period


def _holder() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _guarded(streams: Streams, name: str) -> bool:
    return streams.singleton(f"maintenance-{name}", GUARD_MS, _holder())


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _scan(streams: Streams, kind: str) -> list[str]:
    """Every ``{prefix}:{kind}:*`` key (SCAN, never KEYS)."""
    return sorted(_text(k) for k in streams.r.scan_iter(match=f"{streams.keys.prefix}:{kind}:*", count=1000))


def dead_letter_report(streams: Streams, limit: int = defaults.DLQ_MAXLEN) -> dict:
    """Counts of the dead letters by reason and by the kind of stream they came from (newest ``limit``)."""
    entries = streams.r.xrevrange(streams.keys.dlq, count=limit)
    reasons: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    for _eid, fields in entries:
        reasons[_text(fields.get(b"reason", b"?"))] += 1
        sources[streams.keys.kind(_text(fields.get(b"stream", b"?")))] += 1
    report = {"total": len(entries), "by_reason": dict(reasons.most_common()), "by_stream": dict(sources.most_common()),
              "newest_id": _text(entries[0][0]) if entries else None,
              "oldest_id": _text(entries[-1][0]) if entries else None}
    log.info("dead letters: %d %s", report["total"], report["by_reason"])
    return report


def stale_consumers(streams: Streams, idle_s: float = defaults.WORKER_FORGET_AFTER_S,
                    max_deliveries: int = defaults.MAX_DELIVERIES) -> dict:
    """Claim then delete the group consumers idle ``idle_s`` or more whose worker has no live heartbeat.

    A consumer still holding admission entries with no live verifier to take them, or only entries delivered
    ``max_deliveries`` times (the verifiers' reclaim sweep dead-letters those), is kept for a later sweep."""
    if not _guarded(streams, "stale-consumers"):
        return {"skipped": "another sweep holds the lock"}
    keys = streams.keys
    forgotten = streams.forget_dead_workers()
    live = streams.live_workers()
    verifiers = sorted(w for w, info in live.items() if info.get("role") == "verifier")
    idle_ms = int(idle_s * 1000)
    groups = [(keys.requests, VERIFIERS_GROUP)]
    groups += [(k, VERIFIERS_GROUP) for k in _scan(streams, "verify")]
    groups += [(k, DRAFTERS_GROUP) for k in _scan(streams, "draft")]
    deleted, kept, claimed, dropped = [], [], 0, 0
    for stream, group in groups:
        try:
            consumers = streams.r.xinfo_consumers(stream, group)
        except ResponseError:  # no such stream or group (any more)
            continue
        for c in consumers:
            name = _text(c["name"])
            if name in live or c["idle"] < idle_ms:
                continue
            pending = []
            if c["pending"]:
                pending = streams.r.xpending_range(stream, group, min="-", max="+", count=10_000,
                                                   consumername=name, idle=idle_ms)
            if stream == keys.requests:
                movable = [p["message_id"] for p in pending if p["times_delivered"] < max_deliveries]
                if movable and verifiers:
                    claimed += len(streams.claim(stream, group, verifiers[0], movable, idle_ms))
                if streams.r.xpending_range(stream, group, min="-", max="+", count=1, consumername=name):
                    kept.append(f"{stream}/{name}")
                    continue
            elif pending:
                pipe = streams.transaction()
                streams.ack_delete(pipe, stream, group, [p["message_id"] for p in pending])
                pipe.execute()
                dropped += len(pending)
            streams.r.xgroup_delconsumer(stream, group, name)
            deleted.append(f"{stream}/{name}")
    report = {"forgotten_workers": forgotten, "deleted": deleted, "kept": kept, "claimed": claimed,
              "dropped": dropped, "claimed_for": verifiers[0] if claimed else None}
    if deleted or kept or forgotten:
        log.info("stale consumers: %s", report)
    return report


def orphan_streams(streams: Streams) -> dict:
    """Delete the per-worker streams of workers with no registration (not in ``{prefix}:workers``)."""
    if not _guarded(streams, "orphan-streams"):
        return {"skipped": "another sweep holds the lock"}
    keys = streams.keys
    registered = {_text(w) for w in streams.r.zrange(keys.workers, 0, -1)}
    candidates: dict[str, list[str]] = {}
    for kind in PER_WORKER_KINDS:
        for key in _scan(streams, kind):
            worker = key[len(keys.prefix) + len(kind) + 2:]
            if worker not in registered:
                candidates.setdefault(worker, []).append(key)
    # A worker that registered since the first read keeps its streams (it heartbeats before it reads them).
    pipe = streams.pipeline()
    for worker in candidates:
        pipe.zscore(keys.workers, worker)
    late = {w for w, score in zip(candidates, pipe.execute() if candidates else []) if score is not None}
    removed = sorted(k for w, ks in candidates.items() if w not in late for k in ks)
    for i in range(0, len(removed), 500):
        streams.r.delete(*removed[i:i + 500])
    if removed:
        log.info("removed %d orphaned per-worker streams: %s", len(removed), removed)
    return {"removed": removed}
