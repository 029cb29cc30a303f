"""Redis connections and the stream operations every role shares.

* :func:`connect` builds a client from a URL (``redis://``, ``rediss://``, ``unix://``, with ACL user and
  password) or from Sentinel addresses; replies stay bytes (msgpack payloads).
* :class:`Streams` wraps the few stream patterns the pipeline uses: consumer groups created on demand and
  recreated after ``NOGROUP`` (a Redis restarted without persistence, a failover), batched reads (one
  blocking read, then non-blocking reads up to a size or a window), ack-and-delete in the same
  transaction as the result, dead-lettering with the reason and the original bytes, heartbeats, and a
  ``SET NX PX`` singleton guard for maintenance.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import redis
from redis.exceptions import ResponseError

from cosine import defaults
from cosine.keys import Keys

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict]  # (entry id, field map)


@dataclass
class RedisSettings:
    """Where the broker is and how to talk to it (see :mod:`cosine.defaults` for the timeouts)."""

    url: str = defaults.REDIS_URL
    prefix: str = defaults.KEY_PREFIX
    sentinels: str | None = None  # "host:port,host:port"; then ``url`` is ignored except for the db
    sentinel_master: str = "mymaster"
    username: str | None = None
    password: str | None = None
    socket_timeout_s: float = defaults.SOCKET_TIMEOUT_S


def connect(settings: RedisSettings) -> redis.Redis:
    """A client whose socket timeout exceeds every blocking read we issue."""
    common = {
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.socket_timeout_s,
        "health_check_interval": 30,
        "decode_responses": False,
    }
    if settings.username:
        common["username"] = settings.username
    if settings.password:
        common["password"] = settings.password
    if settings.sentinels:
        from redis.sentinel import Sentinel

        hosts = []
        for part in settings.sentinels.split(","):
            host, _, port = part.strip().rpartition(":")
            hosts.append((host, int(port)))
        return Sentinel(hosts, **common).master_for(settings.sentinel_master)
    return redis.Redis.from_url(settings.url, **common)


def now_ms() -> int:
    return int(time.time() * 1000)


def is_nogroup(exc: Exception) -> bool:
    return isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP")


class Streams:
    """Stream operations over one connection (blocking reads should use a connection of their own)."""

    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r = r
        self.keys = keys
        self._groups: set[tuple[str, str]] = set()

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
        if (stream, group) not in self._groups:
            self.ensure_group(stream, group)
        try:
            reply = self.r.xreadgroup(group, consumer, {stream: start}, count=count, block=block_ms)
        except ResponseError as exc:
            if not is_nogroup(exc):
                raise
            log.warning("group %s on %s vanished (Redis restarted or failed over): recreating it", group, stream)
            self._groups.discard((stream, group))
            self.ensure_group(stream, group)
            return []
        if not reply:
            return []
        # redis-py returns [[stream, [(id, fields), ...]]] (RESP2) or {stream: [[...]]} (RESP3).
        items = reply[0][1] if isinstance(reply, list) else next(iter(reply.values()))[0]
        return [(eid, fields) for eid, fields in items]

    def read_groups(
        self, streams: list[str], group: str, consumer: str, count: int, block_ms: int | None
    ) -> dict[str, list[Entry]]:
        """XREADGROUP over several streams that share a group name; wakes on the first entry in any."""
        for stream in streams:
            if (stream, group) not in self._groups:
                self.ensure_group(stream, group)
        try:
            reply = self.r.xreadgroup(group, consumer, {s: ">" for s in streams}, count=count, block=block_ms)
        except ResponseError as exc:
            if not is_nogroup(exc):
                raise
            log.warning("a %s group vanished (Redis restarted or failed over): recreating", group)
            for stream in streams:
                self._groups.discard((stream, group))
                self.ensure_group(stream, group)
            return {}
        out: dict[str, list[Entry]] = {}
        if isinstance(reply, dict):
            for name, items in reply.items():
                out[name.decode() if isinstance(name, bytes) else name] = [tuple(e) for e in items[0]]
        else:
            for name, items in reply or []:
                out[name.decode() if isinstance(name, bytes) else name] = [(eid, f) for eid, f in items]
        return out

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

    # -- acknowledging --------------------------------------------------------------------------------
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
        for k, v in (fields or {}).items():
            key = k if isinstance(k, bytes) else str(k).encode()
            record[b"orig:" + key[:64]] = v if isinstance(v, (bytes, str, int, float)) else repr(v)
        pipe = self.r.pipeline(transaction=True)
        pipe.xadd(self.keys.dlq, record, maxlen=defaults.DLQ_MAXLEN, approximate=True)
        if group is not None:
            pipe.xack(stream, group, entry_id)
        pipe.xdel(stream, entry_id)
        pipe.execute()
        log.warning("dead-lettered %s %s: %s", stream, entry_id.decode(errors="replace"), reason)

    # -- liveness -------------------------------------------------------------------------------------
    def heartbeat(self, worker_id: str, info: dict[str, str | int | float]) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.zadd(self.keys.workers, {worker_id: now_ms()})
        key = self.keys.worker(worker_id)
        if info:
            pipe.hset(key, mapping={k: str(v) for k, v in info.items()})
        pipe.pexpire(key, int(defaults.WORKER_DEAD_AFTER_S * 1000 * 4))
        pipe.execute()

    def live_workers(self, role: str | None = None, dead_after_s: float = defaults.WORKER_DEAD_AFTER_S) -> dict:
        """Workers with a recent heartbeat: ``{id: info}``, optionally only one role."""
        cutoff = now_ms() - int(dead_after_s * 1000)
        ids = [i.decode() for i in self.r.zrangebyscore(self.keys.workers, cutoff, "+inf")]
        if not ids:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for wid in ids:
            pipe.hgetall(self.keys.worker(wid))
        out = {}
        for wid, info in zip(ids, pipe.execute()):
            decoded = {k.decode(): v.decode() for k, v in info.items()}
            if role is None or decoded.get("role") == role:
                out[wid] = decoded
        return out

    def is_alive(self, worker_id: str, dead_after_s: float = defaults.WORKER_DEAD_AFTER_S) -> bool:
        score = self.r.zscore(self.keys.workers, worker_id)
        return score is not None and now_ms() - score < dead_after_s * 1000

    def forget_worker(self, worker_id: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.zrem(self.keys.workers, worker_id)
        pipe.delete(self.keys.worker(worker_id))
        pipe.execute()

    # -- singletons -----------------------------------------------------------------------------------
    def singleton(self, name: str, ttl_ms: int, holder: str) -> bool:
        """True for exactly one caller per ``ttl_ms`` window (``SET NX PX``)."""
        return bool(self.r.set(self.keys.lock(name), holder, nx=True, px=ttl_ms))
