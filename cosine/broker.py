"""Redis connections and every stream operation the roles share.

* :func:`connect` builds a client from a URL (``redis://``, ``rediss://``, ``unix://``, with ACL user and
  password) or from Sentinel addresses; replies stay bytes (msgpack payloads).
* :class:`Streams` is the one place that writes streams (it owns their ``MAXLEN`` caps and the output
  streams' expiry) and holds the stream patterns the pipeline uses: consumer groups created on demand and
  recreated after ``NOGROUP``, batched reads, ack-and-delete in the same transaction as the result,
  ownership of pending entries (who holds one, keeping it fresh, claiming a dead owner's), dead-lettering
  with the reason and the original bytes, heartbeats, and a ``SET NX PX`` singleton guard for maintenance.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
import redis.asyncio as aioredis
from redis.connection import parse_url
from redis.exceptions import ResponseError

from cosine import defaults
from cosine.errors import CosineError
from cosine.keys import VERIFIERS_GROUP, Keys
from cosine.ownership import may_act, output_name
from cosine.protocol import Chunk, Message, entry

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict]  # (entry id, field map)

# MAXLEN ~ per kind of stream (:meth:`Keys.kind`); every other stream is capped at STREAM_MAXLEN. Job streams
# stay short by deleting entries on ack, so their cap only bounds a stream whose consumers are all gone.
STREAM_CAPS = {"dlq": defaults.DLQ_MAXLEN, "cancel": defaults.CANCEL_MAXLEN, "ask": defaults.VOTE_STREAM_MAXLEN,
               "votes": defaults.VOTE_STREAM_MAXLEN, "control": defaults.CONTROL_LOG_MAXLEN}


class BrokerSettingsError(CosineError):
    """Broker settings that cannot work together (TLS files without TLS, a certificate without its key)."""


@dataclass
class RedisSettings:
    """Where the broker is and how to talk to it (see :mod:`cosine.defaults` for the timeouts).

    TLS is on for a ``rediss://`` URL: ``tls_ca`` is the CA that signed the server's certificate (else the
    system's CAs), ``tls_cert`` / ``tls_key`` the client's certificate and key for a server that asks for one
    (``tls-auth-clients yes``). Through Sentinel, TLS is on for a ``rediss://`` URL or any TLS file, and applies
    to the sentinels and the master alike."""

    url: str = defaults.REDIS_URL
    prefix: str = defaults.KEY_PREFIX
    sentinels: str | None = None  # "host:port,host:port"; then ``url`` only gives the db (and rediss: TLS)
    sentinel_master: str = "mymaster"
    username: str | None = None
    password: str | None = None
    socket_timeout_s: float = defaults.SOCKET_TIMEOUT_S
    tls_ca: str | None = None  # PEM file: the CA that signed the server's certificate
    tls_cert: str | None = None  # PEM file: this client's certificate (servers with tls-auth-clients yes)
    tls_key: str | None = None  # PEM file: this client's private key
    cluster: bool = False  # a Redis Cluster: ``url`` is any node; the prefix becomes a hash tag

    def __post_init__(self) -> None:
        """On a Redis Cluster every key of the deployment carries the prefix as one hash tag (``{cosine}:...``), so
        each transaction (a verifier's pass, a drafter's reply, a cancel) touches one slot."""
        if self.cluster and not (self.prefix.startswith("{") and self.prefix.endswith("}")):
            self.prefix = "{" + self.prefix + "}"

    @property
    def tls(self) -> bool:
        """Whether connections use TLS."""
        files = bool(self.tls_ca or self.tls_cert or self.tls_key)
        return self.url.lower().startswith("rediss://") or (bool(self.sentinels) and files)

    def describe(self) -> str:
        """Where the broker is, safe to log and show (no password; TLS file paths at most)."""
        where = f"sentinel {self.sentinels} ({self.sentinel_master})" if self.sentinels else redact_url(self.url)
        where += " (cluster)" if self.cluster else ""
        if not self.tls:
            return where
        files = ", ".join(f"{name} {path}" for name, path in (("CA", self.tls_ca), ("cert", self.tls_cert)) if path)
        return f"{where} over TLS" + (f" ({files})" if files else "")

    def command_line(self) -> list[str]:
        """The ``cosine`` options for these settings besides the URL, the prefix and the credentials (a worker's
        password travels in its environment, never on its command line)."""
        args: list[str] = []
        if self.sentinels:
            args += ["--sentinels", self.sentinels, "--sentinel-master", self.sentinel_master]
        if self.cluster:
            args.append("--cluster")
        for flag, path in (("--redis-ca", self.tls_ca), ("--redis-cert", self.tls_cert), ("--redis-key", self.tls_key)):
            if path:
                args += [flag, path]
        return args


def _tls_options(settings: RedisSettings) -> dict:
    """redis-py's TLS arguments for ``settings`` (none without TLS). The server's certificate is always
    verified, and its name checked against the host connected to."""
    files = {"ssl_ca_certs": settings.tls_ca, "ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key}
    files = {k: v for k, v in files.items() if v}
    if not settings.tls:
        if files:
            raise BrokerSettingsError("TLS files (--redis-ca, --redis-cert, --redis-key) need a rediss:// URL, "
                                      f"not {redact_url(settings.url)}")
        return {}
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise BrokerSettingsError("a client certificate needs its key: give both --redis-cert and --redis-key")
    for path in files.values():
        if not os.path.isfile(path):
            raise BrokerSettingsError(f"TLS file not found: {path}")
    return {"ssl_cert_reqs": "required", **files}


def _options(settings: RedisSettings) -> tuple[dict, list[tuple[str, int]], dict]:
    """Connection options shared by the blocking and the asyncio clients, the sentinels (if any), and the
    options for connections to the sentinels themselves."""
    common: dict = {
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.socket_timeout_s,
        "health_check_interval": 30,
        "decode_responses": False,
    }
    if settings.username:
        common["username"] = settings.username
    if settings.password:
        common["password"] = settings.password
    tls = _tls_options(settings)
    common.update(tls)
    hosts = []
    sentinel_kwargs: dict = {}
    if settings.sentinels:
        # The master's database comes from the URL (the sentinels know nothing of it).
        common["db"] = int(parse_url(settings.url).get("db", 0))
        for part in settings.sentinels.split(","):
            host, _, port = part.strip().rpartition(":")
            hosts.append((host, int(port)))
        # The sentinels get the socket timeouts and TLS, not the master's credentials (redis-py's default).
        sentinel_kwargs = {k: v for k, v in common.items() if k.startswith("socket_")}
        if tls:
            common["ssl"] = True  # the sentinel pool picks its TLS connection class from this
            sentinel_kwargs.update(ssl=True, **tls)
    return common, hosts, sentinel_kwargs


def redact_url(url: str) -> str:
    """``url`` with its password (``user:password@`` or ``?password=``) shown as ``***``: URLs end up in logs and
    in ``cosine status``, passwords must not."""
    parts = urlsplit(url)
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if netloc == parts.netloc and all(k != "password" for k, _ in pairs):
        return url
    query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe="*")
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def explain_connection_error(exc: Exception, first: bool = True) -> str:
    """A connection error with what usually causes it when the cause is TLS: certificates, or (``first``: no
    connection has worked yet, so a server that went away is unlikely) a plain connection to a TLS port."""
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return (f"{text} (the server's certificate is not signed by a CA this client trusts: give the CA with "
                "--redis-ca / $COSINE_REDIS_CA)")
    if "CERTIFICATE_REQUIRED" in text or "EOF occurred in violation of protocol" in text:
        return f"{text} (the server asks for a client certificate: give --redis-cert and --redis-key)"
    mismatch = ("Connection reset by peer", "Connection closed by server", "WRONG_VERSION_NUMBER")
    if first and any(s in text for s in mismatch):
        return (f"{text} (a plain redis:// connection to a port that speaks TLS, or the reverse? A TLS port needs "
                "rediss:// and the CA with --redis-ca; one that asks for client certificates, --redis-cert and "
                "--redis-key too)")
    return text


def connect(settings: RedisSettings) -> redis.Redis:
    """A client whose socket timeout exceeds every blocking read we issue."""
    common, sentinels, sentinel_kwargs = _options(settings)
    if sentinels:
        from redis.sentinel import Sentinel

        return Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs, **common).master_for(settings.sentinel_master)
    if settings.cluster:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(settings.url, **common)
    return redis.Redis.from_url(settings.url, **common)


def connect_async(settings: RedisSettings) -> aioredis.Redis:
    """The asyncio client for the same settings as :func:`connect`."""
    common, sentinels, sentinel_kwargs = _options(settings)
    if sentinels:
        from redis.asyncio.sentinel import Sentinel

        return Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs, **common).master_for(settings.sentinel_master)
    if settings.cluster:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(settings.url, **common)
    return aioredis.Redis.from_url(settings.url, **common)


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

    def heartbeat(self, worker_id: str, info: dict[str, str | int | float], inflight: str | None = None) -> None:
        """Register the worker now with ``info``; ``inflight`` (a verifier's requests, JSON) goes under a key
        of its own that producers may not read."""
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
        pipe.execute()

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
