"""Every stream operation the roles share (connections: :mod:`cosine.connection`, re-exported here).

* :class:`Streams` is the one place that writes streams (it owns their ``MAXLEN`` caps and the output
  streams' expiry) and holds the stream patterns the pipeline uses: consumer groups created on demand and
  recreated after ``NOGROUP``, batched reads, ack-and-delete in the same transaction as the result,
  ownership of pending entries (who holds one, keeping it fresh, claiming a dead owner's), dead-lettering
  with the reason and the original bytes, heartbeats, and a ``SET NX PX`` singleton guard for maintenance.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import redis
from redis.exceptions import ResponseError

from cosine import defaults
from cosine.connection import (  # noqa: F401 - re-exported: callers import the connection API from here too
    BrokerSettingsError,
    RedisSettings,
    connect,
    connect_async,
    explain_connection_error,
    redact_url,
)
from cosine.keys import VERIFIERS_GROUP, Keys
from cosine.ownership import may_act, output_name
from cosine.protocol import Chunk, Message, entry

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict]  # (entry id, field map)

# MAXLEN ~ per kind of stream (:meth:`Keys.kind`); every other stream is capped at STREAM_MAXLEN. Job streams
# stay short by deleting entries on ack, so their cap only bounds a stream whose consumers are all gone.
STREAM_CAPS = {"dlq": defaults.DLQ_MAXLEN, "cancel": defaults.CANCEL_MAXLEN, "ask": defaults.VOTE_STREAM_MAXLEN,
               "votes": defaults.VOTE_STREAM_MAXLEN, "control": defaults.CONTROL_LOG_MAXLEN}


def entry_ms(entry_id: bytes | str) -> int:
    """When the broker added a stream entry: the milliseconds part of its id (``1700000000000-3``)."""
    raw = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(raw.split("-", 1)[0])


def now_ms() -> int:
    return int(time.time() * 1000)


_clock_offset_ms = 0  # the broker's clock minus this host's, as last read (server_ms)


def server_ms(reply) -> int:
    """A ``TIME`` reply (seconds, microseconds) in milliseconds; also updates this process's estimate of how
    far the broker's clock is from its own (:func:`wall_ms`)."""
    global _clock_offset_ms
    sec, usec = reply
    ms = int(sec) * 1000 + int(usec) // 1000
    _clock_offset_ms = ms - now_ms()
    return ms


def wall_ms() -> int:
    """This host's clock set to the broker's (as of the last ``TIME`` this process read): a request's deadline
    is stamped by a client and enforced by a verifier, on hosts whose clocks may disagree by seconds."""
    return now_ms() + _clock_offset_ms


def is_nogroup(exc: Exception) -> bool:
    return isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP")


def _text(raw: bytes | str) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else raw


def xadd_args(keys: Keys, stream: str, msg: Message | dict) -> dict:
    """The XADD arguments for ``msg`` on ``stream``, under the stream's cap (also for asyncio clients)."""
    fields = entry(msg) if isinstance(msg, Message) else msg
    cap = STREAM_CAPS.get(keys.kind(stream), defaults.STREAM_MAXLEN)
    return {"name": stream, "fields": fields, "maxlen": cap, "approximate": True}


class Streams:
    """Stream operations over one connection (blocking reads should use a connection of their own)."""

    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r = r
        self.keys = keys
        self._groups: set[tuple[str, str]] = set()

    # -- writing --------------------------------------------------------------------------------------
    def transaction(self):
        """A MULTI pipeline: what is queued on it (results, acks) happens together or not at all."""
        return self.r.pipeline(transaction=True)

    def pipeline(self):
        """A plain pipeline: one round trip, no atomicity."""
        return self.r.pipeline(transaction=False)

    def add(self, stream: str, msg: Message | dict, pipe=None):
        """XADD ``msg`` (a message, or a raw field map) to ``stream`` under its cap, on ``pipe`` if given."""
        return (pipe if pipe is not None else self.r).xadd(**xadd_args(self.keys, stream, msg))

    def add_output(self, pipe, chunk: Chunk, owner: str | None = None) -> None:
        """Queue a request's output chunk (on the stream its ``owner`` reads) and the stream's expiry:
        ``OUTPUT_OPEN_TTL_S`` after each chunk while the request runs, ``OUTPUT_TTL_S`` for late readers after
        the last."""
        key = self.keys.out(output_name(chunk.request_id, owner))
        self.add(key, chunk, pipe)
        ttl = defaults.OUTPUT_TTL_S if chunk.finished else defaults.OUTPUT_OPEN_TTL_S
        pipe.pexpire(key, int(ttl * 1000))

    @staticmethod
    def ack_delete(pipe, stream: str, group: str, ids: Iterable[bytes]) -> None:
        """Queue XACK + XDEL of ``ids`` on ``pipe`` (a MULTI pipeline that also holds the effect)."""
        ids = list(ids)
        if ids:
            pipe.xack(stream, group, *ids)
            pipe.xdel(stream, *ids)

    def dead_letter(
        self, stream: str, group: str | None, entry_id: bytes, fields: dict, reason: str, origin: str = ""
    ) -> None:
        """Move an entry to the dead-letter stream with the reason and its original bytes, atomically."""
        record: dict = {b"stream": stream, b"id": entry_id, b"reason": reason[:2000], b"origin": origin}
        cap = defaults.DLQ_FIELD_BYTES
        for k, v in list((fields or {}).items())[:16]:  # a dead letter keeps a bounded sample of the entry
            key = k if isinstance(k, bytes) else str(k).encode()
            value = v if isinstance(v, (bytes, str, int, float)) else repr(v)
            if isinstance(value, (bytes, str)) and len(value) > cap:
                record[b"size:" + key[:64]] = len(value)
                value = value[:cap]
            record[b"orig:" + key[:64]] = value
        pipe = self.transaction()
        self.add(self.keys.dlq, record, pipe)
        if group is not None:
            pipe.xack(stream, group, entry_id)
        pipe.xdel(stream, entry_id)
        pipe.execute()
        log.warning("dead-lettered %s %s: %s", stream, entry_id.decode(errors="replace"), reason)

    # -- groups ---------------------------------------------------------------------------------------
    def ensure_group(self, stream: str, group: str, start: str = "0") -> None:
        try:
            self.r.xgroup_create(stream, group, id=start, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add((stream, group))

    def forget_groups(self) -> None:
        """Forget which groups exist (after Redis lost its data): the next read recreates them."""
        self._groups.clear()

    # -- reading --------------------------------------------------------------------------------------
    def read_group(
        self, stream: str, group: str, consumer: str, count: int, block_ms: int | None, start: str = ">"
    ) -> list[Entry]:
        """XREADGROUP on one stream; recreates the group on NOGROUP and returns nothing that time."""
        return self.read_groups([stream], group, consumer, count, block_ms, start).get(stream, [])

    def read_groups(
        self, streams: list[str], group: str, consumer: str, count: int, block_ms: int | None, start: str = ">"
    ) -> dict[str, list[Entry]]:
        """XREADGROUP over several streams that share a group name; wakes on the first entry in any."""
        for stream in streams:
            if (stream, group) not in self._groups:
                self.ensure_group(stream, group)
        try:
            reply = self.r.xreadgroup(group, consumer, {s: start for s in streams}, count=count, block=block_ms)
        except ResponseError as exc:
            if not is_nogroup(exc):
                raise
            log.warning("a %s group vanished (Redis restarted or failed over): recreating", group)
            for stream in streams:
                self._groups.discard((stream, group))
                self.ensure_group(stream, group)
            return {}
        return _by_stream(reply)

    def read_batch(
        self, stream: str, group: str, consumer: str, max_count: int, window_ms: float, block_ms: int
    ) -> list[Entry]:
        """One blocking read, then non-blocking reads until ``max_count`` entries or ``window_ms`` pass.

        ``BLOCK`` returns as soon as one entry exists, so batching needs this accumulation window."""
        batch = self.read_group(stream, group, consumer, max_count, block_ms)
        if not batch:
            return batch
        deadline = time.perf_counter() + window_ms / 1000
        while len(batch) < max_count and time.perf_counter() < deadline:
            more = self.read_group(stream, group, consumer, max_count - len(batch), None)
            if not more:
                time.sleep(min(0.0005, max(0.0, deadline - time.perf_counter())))
                continue
            batch.extend(more)
        return batch

    def own_pending(self, stream: str, group: str, consumer: str, count: int = 1000) -> list[Entry]:
        """Entries already delivered to ``consumer`` and not acknowledged (after a restart or a claim)."""
        return self.read_group(stream, group, consumer, count, None, start="0")

    def latest_id(self, stream: str) -> bytes | str:
        """The id of the stream's newest entry ("0-0" when empty): read from here for what comes next."""
        last = self.r.xrevrange(stream, count=1)
        return last[0][0] if last else "0-0"

    def read_after(self, stream: str, cursor: bytes | str, count: int, block_ms: int | None = None) -> list[Entry]:
        """Entries after ``cursor`` on a stream read without a group (XREAD)."""
        return _by_stream(self.r.xread({stream: cursor}, count=count, block=block_ms)).get(stream, [])

    def entries(self, stream: str, first: bytes | str = "-", last: bytes | str = "+") -> list[Entry]:
        """The entries of a (short) stream from ``first`` to ``last``, oldest first."""
        return self.r.xrange(stream, first, last)

    def earlier_outputs(self, requests: list[tuple[str, str | None]]) -> list[tuple[list[Entry], bool]]:
        """Per (request id, owner secret), in one round trip for all: its output stream so far and whether it
        was cancelled by its owner (what a verifier taking it over resumes from)."""
        pipe = self.pipeline()
        for rid, owner in requests:
            pipe.xrange(self.keys.out(output_name(rid, owner)))
            pipe.get(self.keys.cancelled(rid))
        got = pipe.execute() if requests else []
        return [(got[2 * i], got[2 * i + 1] is not None and may_act(rid, _text(got[2 * i + 1])))
                for i, (rid, _owner) in enumerate(requests)]

    # -- ownership of pending entries -----------------------------------------------------------------
    def owners(self, stream: str, group: str, ids: list[bytes]) -> list[str | None]:
        """The consumer each entry is pending for (None when it is not pending any more)."""
        pipe = self.pipeline()
        for eid in ids:
            pipe.xpending_range(stream, group, min=eid, max=eid, count=1)
        return [rows[0]["consumer"].decode() if rows else None for rows in pipe.execute()]

    def touch(self, stream: str, group: str, consumer: str, ids: list[bytes], min_idle_ms: int) -> None:
        """Reset the idle time of our own pending entries (XCLAIM JUSTID), so nobody takes them for a dead
        owner's; an entry idle less than ``min_idle_ms`` (just claimed by another) is left alone."""
        if ids:
            self.r.xclaim(stream, group, consumer, min_idle_ms, ids, justid=True)

    def idle_pending(self, stream: str, group: str, min_idle_ms: int, count: int = 1000) -> list[dict]:
        """Pending entries idle at least ``min_idle_ms`` (id, consumer, idle time, times delivered)."""
        return self.r.xpending_range(stream, group, min="-", max="+", count=count, idle=min_idle_ms)

    def claim(self, stream: str, group: str, consumer: str, ids: list[bytes], min_idle_ms: int) -> list[Entry]:
        """Take over pending entries (XCLAIM); entries deleted meanwhile are left out."""
        got = self.r.xclaim(stream, group, consumer, min_idle_ms, ids) if ids else []
        return [(eid, fields) for eid, fields in got if fields]

    # -- liveness -------------------------------------------------------------------------------------
    def server_ms(self) -> int:
        """Redis's clock in milliseconds: liveness compares heartbeats written on one host with the time read
        on another, so both sides use the broker's clock, not their own (a few seconds of skew between hosts
        made live workers look dead, or dead ones alive)."""
        return server_ms(self.r.time())

    def heartbeat(self, worker_id: str, info: dict[str, str | int | float], inflight: str | None = None
                  ) -> str | None:
        """Register the worker now with ``info``; ``inflight`` (a verifier's requests, JSON) goes under a key
        of its own that producers may not read. Returns why the worker was asked to drain, if it was (read in
        the same round trip)."""
        stamp = self.server_ms()
        expiry = int(defaults.WORKER_DEAD_AFTER_S * 1000 * 4)
        pipe = self.pipeline()
        pipe.zadd(self.keys.workers, {worker_id: stamp})
        key = self.keys.worker(worker_id)
        if info:
            pipe.hset(key, mapping={k: str(v) for k, v in info.items()})
        pipe.pexpire(key, expiry)
        if inflight is not None:
            pipe.set(self.keys.inflight(worker_id), inflight, px=expiry)
        pipe.hget(self.keys.drain, worker_id)
        drain = pipe.execute()[-1]
        return None if drain is None else _text(drain)

    def live_workers(self, role: str | None = None, dead_after_s: float = defaults.WORKER_DEAD_AFTER_S) -> dict:
        """Workers with a recent heartbeat (by the broker's clock): ``{id: info}``, optionally only one role."""
        cutoff = self.server_ms() - int(dead_after_s * 1000)
        ids = [i.decode() for i in self.r.zrangebyscore(self.keys.workers, cutoff, "+inf")]
        if not ids:
            return {}
        pipe = self.pipeline()
        for wid in ids:
            pipe.hgetall(self.keys.worker(wid))
        out = {}
        for wid, info in zip(ids, pipe.execute()):
            decoded = {k.decode(): v.decode() for k, v in info.items()}
            if role is None or decoded.get("role") == role:
                out[wid] = decoded
        return out

    def forget_worker(self, worker_id: str) -> None:
        pipe = self.pipeline()
        pipe.zrem(self.keys.workers, worker_id)
        pipe.delete(self.keys.worker(worker_id))
        pipe.execute()

    def forget_dead_workers(self, silent_s: float = defaults.WORKER_FORGET_AFTER_S) -> list[str]:
        """Forget workers silent for ``silent_s``: their registry entry and their own streams, and their
        consumer in the request group when nothing is pending for it (else a later sweep, once a reclaim has
        taken their entries). Returns the workers forgotten."""
        cutoff = self.server_ms() - int(silent_s * 1000)
        gone = [w.decode() for w in self.r.zrangebyscore(self.keys.workers, "-inf", cutoff)]
        if not gone:
            return []
        try:
            consumers = {c["name"].decode(): c["pending"]
                         for c in self.r.xinfo_consumers(self.keys.requests, VERIFIERS_GROUP)}
        except ResponseError:  # no request stream or group yet
            consumers = {}
        pipe = self.pipeline()
        forgotten = []
        for w in gone:
            if consumers.get(w, 0):
                continue  # its requests are still pending for it: the reclaim sweep moves them first
            forgotten.append(w)
            pipe.delete(self.keys.draft(w), self.keys.verify(w), self.keys.ask(w), self.keys.votes(w),
                        self.keys.worker(w))
            pipe.zrem(self.keys.workers, w)
            if w in consumers:
                pipe.xgroup_delconsumer(self.keys.requests, VERIFIERS_GROUP, w)
        pipe.execute()
        if forgotten:
            log.info("forgot %d workers silent for %.0f s: %s", len(forgotten), silent_s, forgotten)
        return forgotten

    # -- singletons -----------------------------------------------------------------------------------
    def singleton(self, name: str, ttl_ms: int, holder: str) -> bool:
        """True for exactly one caller per ``ttl_ms`` window (``SET NX PX``)."""
        return bool(self.r.set(self.keys.lock(name), holder, nx=True, px=ttl_ms))


def _by_stream(reply) -> dict[str, list[Entry]]:
    """An XREAD / XREADGROUP reply as ``{stream: [(id, fields), ...]}`` (RESP2 lists or RESP3 maps)."""
    out: dict[str, list[Entry]] = {}
    if isinstance(reply, dict):
        for name, items in reply.items():
            out[name.decode() if isinstance(name, bytes) else name] = [tuple(e) for e in items[0]]
    else:
        for name, items in reply or []:
            out[name.decode() if isinstance(name, bytes) else name] = [(eid, f) for eid, f in items]
    return out
