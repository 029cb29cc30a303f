"""The controller process: watches queue depths and worker load, publishes speculation bounds and batch limits.

Every ``interval_ms`` (default :data:`cosine.defaults.CONTROL_INTERVAL_MS`) the active controller

1. **samples** (one pipelined round trip, plus one more when entries wait): Redis ``TIME``; ``XINFO GROUPS``,
   the ``XPENDING`` summary and ``XLEN`` of the requests stream and of every live worker's ``draft:{id}`` /
   ``verify:{id}`` stream; the live workers' heartbeat stats. Depth = ``lag + pending``; a NULL ``lag``
   (Redis 7.0 after undelivered entries were deleted) is estimated as ``XLEN - pending``. The oldest pending
   and oldest waiting entries' ages come from their stream ids (Redis's clock, so no skew). A worker's busy
   share is the growth of its ``busy_s`` over its ``uptime_s`` (or heartbeat time) in the last
   ``busy_window_s``, not its lifetime average;
2. **decides** with :class:`cosine.policy.control_policy.ControlPolicy` (the rules are documented there);
3. **publishes** when the decision changed: one ``MULTI`` rewrites the ``control`` hash (all fields of
   :meth:`ControlDecision.to_dict` plus ``controller``) and appends the decision with the inputs and derived
   signals (JSON) to the ``control:log`` stream (``MAXLEN ~``), under ``WATCH`` of the hash, so a controller
   that lost its lease never overwrites a newer decision. An unchanged decision is still logged every
   ``log_every_s`` (``kind=sample``), so the timeline stays alive; starts, take-overs and stops are logged too.

One controller is active at a time: it holds ``lock:controller`` (``SET NX PX``, renewed every interval);
others wait as standbys and take over when the lease lapses (or at once after a clean stop). A controller
that starts (or takes over) continues from the stored decision and its version; if Redis lost the hash it
republishes its last decision under the next version. Workers keep the last decision when the controller
dies (:class:`cosine.service.control_view.ControlView`). A lost Redis is retried forever with backoff.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace

import redis

from cosine import defaults
from cosine.broker import RedisSettings, Streams, connect, entry_ms
from cosine.keys import DRAFTERS_GROUP, VERIFIERS_GROUP, Keys
from cosine.policy.control_policy import ControlDecision, ControlInputs, ControlPolicy, StreamDepth, WorkerLoad, signals
from cosine.service.heartbeat import Heartbeat
from cosine.service.run_loop import run_forever

log = logging.getLogger(__name__)

LOCK_NAME = "controller"

# Renew / release the lease only while we still hold it.
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


@dataclass
class ControllerSettings:
    worker_id: str = "controller"
    interval_ms: int = defaults.CONTROL_INTERVAL_MS
    lease_ms: int = defaults.CONTROL_LEASE_MS
    log_every_s: float = defaults.CONTROL_LOG_EVERY_S
    busy_window_s: float = defaults.CONTROL_BUSY_WINDOW_S
    heartbeat_interval_s: float = defaults.HEARTBEAT_INTERVAL_S


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _version(raw) -> int | None:
    """The hash's ``version`` field: None when missing, -1 when unreadable (then it is overwritten)."""
    if raw is None:
        return None
    try:
        return int(raw)
    except (TypeError, ValueError):
        return -1


class PublishConflict(Exception):
    """Someone else (another controller) changed the control hash since we last read it."""


class ControllerService:
    def __init__(self, redis_settings: RedisSettings, settings: ControllerSettings | None = None,
                 policy: ControlPolicy | None = None) -> None:
        self.settings = settings or ControllerSettings()
        self.keys = Keys(redis_settings.prefix)
        self.r = connect(redis_settings)
        self.streams = Streams(self.r, self.keys)
        self.policy = policy or ControlPolicy()
        self.me = self.settings.worker_id
        self.holder = f"{self.me}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # unique even if two share a name
        self._renew = self.r.register_script(_RENEW)
        self._release = self.r.register_script(_RELEASE)
        self.decision: ControlDecision = self.policy.initial()
        self.leader = False
        self.inputs: ControlInputs | None = None
        self.stored_version: int | None = None  # the hash's version as of the last sample
        self.decisions = 0  # decisions this process published
        self._last_log = float("-inf")
        self._busy_hist: dict[str, deque] = {}
        self._standby_logged = False
        self.heartbeat = Heartbeat(Streams(connect(redis_settings), self.keys), self.me, self.info,
                                   self.settings.heartbeat_interval_s)

    def info(self) -> dict:
        return {
            "role": "controller",
            "state": "active" if self.leader else "standby",
            "version": self.decision.version,
            "decisions": self.decisions,
            "interval_ms": self.settings.interval_ms,
            "active": 0,
            "pid": os.getpid(),
        }

    # -- sampling -------------------------------------------------------------------------------------
    def sample(self) -> ControlInputs:
        """One look at Redis: stream depths, live workers' load, the stored control version."""
        live = self.streams.live_workers()
        verifiers = sorted(w for w, i in live.items() if i.get("role") == "verifier")
        drafters = sorted(w for w, i in live.items() if i.get("role") == "drafter")
        targets = ([(self.keys.requests, VERIFIERS_GROUP)] + [(self.keys.verify(v), VERIFIERS_GROUP) for v in verifiers]
                   + [(self.keys.draft(d), DRAFTERS_GROUP) for d in drafters])
        now = self.streams.server_ms()  # on its own: a Redis Cluster pipeline cannot carry TIME
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(self.keys.control, "version")
        for stream, group in targets:
            pipe.xinfo_groups(stream)
            pipe.xpending(stream, group)
            pipe.xlen(stream)
        for wid in verifiers + drafters:
            pipe.zscore(self.keys.workers, wid)
        replies = pipe.execute(raise_on_error=False)
        if isinstance(replies[0], Exception):
            raise replies[0]
        self.stored_version = _version(replies[0])

        depths: list[StreamDepth] = []
        waiting: list[tuple[int, str, str]] = []  # (index in depths, stream, last-delivered-id)
        pos = 1
        for stream, group in targets:
            groups, summary, length = replies[pos:pos + 3]
            pos += 3
            info = None
            if not isinstance(groups, Exception):
                info = next((g for g in groups if _s(g.get("name")) == group), None)
            if info is None:  # no stream or no group yet: nothing queued there
                depths.append(StreamDepth(stream, 0, 0))
                continue
            pending = int(info.get("pending") or 0)
            lag, estimated = info.get("lag"), False
            if lag is None:  # NULL after undelivered entries were deleted: estimate (acked entries are deleted)
                lag, estimated = max(0, int(length if isinstance(length, int) else 0) - pending), True
            oldest_pending = 0.0
            if not isinstance(summary, Exception) and summary and summary.get("min"):
                oldest_pending = float(max(0, now - entry_ms(summary["min"])))
            depths.append(StreamDepth(stream, int(lag), pending, oldest_pending, 0.0, estimated))
            if lag:
                waiting.append((len(depths) - 1, stream, _s(info.get("last-delivered-id") or "0-0")))
        if waiting:  # the oldest undelivered entry is the first one after the group's last-delivered id
            pipe = self.r.pipeline(transaction=False)
            for _, stream, last in waiting:
                pipe.xrange(stream, min=f"({last}", count=1)
            for (i, _, _), reply in zip(waiting, pipe.execute(raise_on_error=False)):
                if reply and not isinstance(reply, Exception):
                    depths[i].oldest_waiting_ms = float(max(0, now - entry_ms(reply[0][0])))

        beats = {}
        for wid, score in zip(verifiers + drafters, replies[pos:]):
            beats[wid] = float(score) if isinstance(score, (int, float)) else float(now)
        loads = {wid: self._load(wid, live[wid], beats[wid]) for wid in verifiers + drafters}
        for gone in set(self._busy_hist) - set(loads):
            del self._busy_hist[gone]
        n_v = len(verifiers)
        self.inputs = ControlInputs(
            at_ms=now,
            requests=depths[0],
            verifies=depths[1:1 + n_v],
            drafts=depths[1 + n_v:],
            verifiers=[loads[w] for w in verifiers],
            drafters=[loads[w] for w in drafters],
        )
        return self.inputs

    def _load(self, wid: str, info: dict, beat_ms: float) -> WorkerLoad:
        def num(name, default=0.0):
            try:
                return float(info.get(name, default))
            except (TypeError, ValueError):
                return default

        lifetime = max(0.0, min(1.0, num("busy")))
        busy = lifetime
        if "busy_s" in info:
            t = num("uptime_s") if "uptime_s" in info else beat_ms / 1000  # the worker's own clock if it says
            hist = self._busy_hist.setdefault(wid, deque())
            if hist and (t < hist[-1][0] or num("busy_s") < hist[-1][1]):  # the worker restarted
                hist.clear()
            if not hist or t > hist[-1][0]:
                hist.append((t, num("busy_s")))
            while len(hist) > 2 and t - hist[1][0] >= self.settings.busy_window_s:
                hist.popleft()
            t0, b0 = hist[0]
            if t - t0 >= 0.25:
                busy = max(0.0, min(1.0, (hist[-1][1] - b0) / (t - t0)))
        return WorkerLoad(wid, info.get("role", "?"), round(busy, 4), int(num("active")),
                          int(num("capacity")))

    # -- publishing -----------------------------------------------------------------------------------
    def load(self) -> ControlDecision | None:
        """The stored decision, or None when there is none (or it is unreadable)."""
        raw = self.r.hgetall(self.keys.control)
        if not raw:
            return None
        try:
            return ControlDecision.from_dict(raw)
        except ValueError as exc:
            log.warning("ignoring an unreadable control hash: %s", exc)
            return None

    def _log_fields(self, kind: str, decision: ControlDecision, inputs: ControlInputs | None) -> dict:
        sig = self.policy.last_signals
        return {
            "kind": kind,
            "controller": self.me,
            **decision.to_dict(),
            "assessment": self.policy.assessment,
            "signals": json.dumps(sig.to_dict() if sig else {}, separators=(",", ":")),
            "inputs": json.dumps(inputs.to_dict() if inputs else {}, separators=(",", ":")),
        }

    def publish(self, decision: ControlDecision, kind: str = "decision", expected: int | None = None,
                write_hash: bool = True) -> None:
        """Write the hash (when ``write_hash``) and a log entry in one MULTI, only if the hash's version is
        still ``expected`` (None = no hash); raises :class:`PublishConflict` otherwise."""
        fields = self._log_fields(kind, decision, self.inputs)
        with self.r.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(self.keys.control)
                current = _version(pipe.hget(self.keys.control, "version"))
                if current != expected:
                    raise PublishConflict(f"control hash is at version {current}, expected {expected}")
                pipe.multi()
                if write_hash:
                    pipe.delete(self.keys.control)
                    pipe.hset(self.keys.control, mapping={**decision.to_dict(), "controller": self.me})
                self.streams.add(self.keys.control_log, fields, pipe)
                pipe.execute()
            except redis.WatchError:
                raise PublishConflict("control hash changed while publishing") from None
        self._last_log = time.monotonic()
        if write_hash:
            self.decisions += 1
            self.stored_version = decision.version
            self.decision = decision
            log.info("control v%d: k %d..%d, cooperating %d, batch %d (%d tokens), pressure %+.1f: %s",
                     decision.version, decision.k_min, decision.k_max, decision.max_cooperating,
                     decision.verifier_max_batch, decision.verifier_token_cap, decision.pressure, decision.reason)

    def take_over(self) -> None:
        """Become the active controller: continue from the stored decision (or publish the first one)."""
        self.policy.reset()
        inputs = self.sample()
        self.policy.last_signals = signals(inputs)  # for the log entry
        stored = self.load()
        if stored is None:
            known = self.decision.version > 0
            base = self.decision if known else self.policy.initial()
            reason = (f"controller {self.me} republished its last decision: the control key was missing" if known
                      else f"controller {self.me} started: defaults")
            first = replace(base, version=base.version + 1, reason=reason, at_ms=inputs.at_ms)
            self.publish(first, "start", expected=self.stored_version)
        else:
            self.decision = stored
            self.stored_version = stored.version
            started = replace(stored, reason=f"controller {self.me} took over at version {stored.version}")
            self.publish(started, "start", expected=stored.version, write_hash=False)
            log.info("controller %s continues from control version %d", self.me, stored.version)

    def step(self) -> ControlDecision:
        """Sample, decide, publish if changed (or log the unchanged decision now and then)."""
        inputs = self.sample()
        if self.stored_version != self.decision.version:
            if self.stored_version is None or self.stored_version < 0:  # Redis lost the key, or it is garbage
                self.take_over()
                return self.decision
            log.warning("control hash moved to version %s behind our back (another controller?): adopting it",
                        self.stored_version)
            self.policy.reset()
            self.decision = self.load() or self.decision
            return self.decision
        decision = self.policy.decide(inputs, self.decision)
        try:
            if decision.version != self.decision.version:
                self.publish(decision, "decision", expected=self.decision.version)
            elif time.monotonic() - self._last_log >= self.settings.log_every_s:
                self.publish(self.decision, "sample", expected=self.decision.version, write_hash=False)
                log.debug("control v%d unchanged (%s)", self.decision.version, self.policy.assessment)
        except PublishConflict as exc:
            log.warning("not publishing: %s; re-reading", exc)
            self.policy.reset()
            self.decision = self.load() or self.decision
        return self.decision

    # -- the lease ------------------------------------------------------------------------------------
    def hold_lease(self) -> bool:
        """Take or renew ``lock:controller``; True while this process is the active controller."""
        lock = self.keys.lock(LOCK_NAME)
        if self.leader:
            if self._renew(keys=[lock], args=[self.holder, self.settings.lease_ms]):
                return True
            log.warning("controller %s lost its lease: standing by", self.me)
            self.leader = False
        if self.streams.singleton(LOCK_NAME, self.settings.lease_ms, self.holder):
            self.leader = True
            self._standby_logged = False
            log.info("controller %s is active (interval %d ms)", self.me, self.settings.interval_ms)
            try:
                self.take_over()
            except PublishConflict as exc:  # someone published between our read and our write: adopt it
                log.warning("controller %s: %s; continuing from the stored decision", self.me, exc)
                self.decision = self.load() or self.decision
                self.stored_version = self.decision.version
            return True
        if not self._standby_logged:
            holder = self.r.get(lock)
            log.info("controller %s standing by: %s is active", self.me, _s(holder) if holder else "another")
            self._standby_logged = True
        return False

    def release(self) -> None:
        if not self.leader:
            return
        self.leader = False
        try:
            stop = replace(self.decision, reason=f"controller {self.me} stopped; workers keep version "
                                                 f"{self.decision.version}")
            self.publish(stop, "stop", expected=self.decision.version, write_hash=False)
        except (redis.RedisError, PublishConflict):
            pass
        try:
            self._release(keys=[self.keys.lock(LOCK_NAME)], args=[self.holder])
        except redis.RedisError:
            pass

    # -- the loop -------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Until ``stop`` is set (SIGTERM): hold the lease and step, or stand by; then hand over cleanly."""
        log.info("controller %s started (interval %d ms, lease %d ms)", self.me, self.settings.interval_ms,
                 self.settings.lease_ms)
        run_forever(f"controller {self.me}", stop, self.turn, on_stop=self._stopped, heartbeat=self.heartbeat,
                    pace_s=self.settings.interval_ms / 1000)

    def turn(self) -> None:
        """One interval: step while holding the lease, else stand by."""
        if self.hold_lease():
            self.step()

    def _stopped(self) -> None:
        self.release()
        log.info("controller %s stopped at control version %d", self.me, self.decision.version)
