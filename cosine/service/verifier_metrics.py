"""A verifier's timers and counters: what its heartbeat publishes, what speculation control learns a round
costs besides its forward, and the optional pass trace (:mod:`cosine.service.pass_trace`).

Timers (seconds, cumulative): ``busy_s`` target forwards (prefills included), ``admit_s`` of it prefilling
admitted requests, ``messaging_s`` Redis calls and (de)serialisation on the round path, ``blocked_s``
blocking reads (idle, or waiting for drafts), ``draft_wait_s`` of it while holding requests (waiting for
drafts), ``scheduling_s`` choosing what to verify.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import time

from cosine.histogram import LatencyRecorder
from cosine.service.pass_trace import PassTrace

TIMERS = ("busy_s", "admit_s", "messaging_s", "blocked_s", "draft_wait_s", "scheduling_s")


class VerifierMetrics:
    def __init__(self, trace_path: str | None = None) -> None:
        self.started = time.monotonic()
        self.rounds = 0
        self.completed = 0
        self.counters: collections.Counter[str] = collections.Counter()
        self.busy_s = self.admit_s = self.messaging_s = 0.0
        self.blocked_s = self.draft_wait_s = self.scheduling_s = 0.0
        self.trace = PassTrace(trace_path) if trace_path else None
        self.latency = LatencyRecorder()
        # Verified drafts by drafter worker and by domain (the prompt feature): [drafts, draft tokens, accepted].
        self.spec_by: dict[str, dict[str, list[int]]] = {"drafter": {}, "domain": {}}
        self._at_last_pass: tuple[float, float] | None = None

    @contextlib.contextmanager
    def timed(self, *timers: str):
        """Add the block's duration to each named timer."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - t0
            for name in timers:
                setattr(self, name, getattr(self, name) + elapsed)

    def since_last_pass(self) -> tuple[float, float] | None:
        """(ms waiting for drafts, ms of other work besides forwards: Redis, scheduling, prefilling arrivals)
        since the previous call; None at the first (start-up is not a round)."""
        now = (self.draft_wait_s, self.messaging_s + self.scheduling_s + self.admit_s)
        last, self._at_last_pass = self._at_last_pass, now
        if last is None:
            return None
        return 1000 * (now[0] - last[0]), 1000 * (now[1] - last[1])

    def verified(self, depth: int, accepted: int, drafter: str = "", domain: str = "") -> None:
        """Count one verified draft as vLLM's speculative-decoding metrics do: drafts, draft tokens, accepted
        tokens, and acceptances per draft position (``spec_accepted_pos_{i}``); the same three also by drafter
        worker and by domain."""
        if depth <= 0:
            return
        c = self.counters
        c["spec_drafts"] += 1
        c["spec_draft_tokens"] += depth
        c["spec_accepted_tokens"] += accepted
        for i in range(accepted):
            c[f"spec_accepted_pos_{i}"] += 1
        for kind, name in (("drafter", drafter), ("domain", domain)):
            tally = self.spec_by[kind].setdefault(name or "(unknown)", [0, 0, 0])
            tally[0] += 1
            tally[1] += depth
            tally[2] += accepted

    def trace_pass(self, slots: dict[str, int], **fields) -> None:
        """One line of the pass trace (when on): ``fields`` and the timers' growth since the last line."""
        if self.trace is not None:
            self.trace.record({"admit_ms": 1000 * self.admit_s, "messaging_ms": 1000 * self.messaging_s,
                               "blocked_ms": 1000 * self.blocked_s, "scheduling_ms": 1000 * self.scheduling_s,
                               **slots}, **fields)

    def snapshot(self) -> dict:
        """Counters and timers for the heartbeat."""
        up = max(time.monotonic() - self.started, 1e-9)
        return {
            "rounds": self.rounds,
            "completed": self.completed,
            "busy": round(self.busy_s / up, 4),
            "uptime_s": round(up, 3),
            "pid": os.getpid(),
            **{name: round(getattr(self, name), 4) for name in TIMERS},
            **dict(self.counters),
            "latency": self.latency.wire(),
            "spec_by": json.dumps(self.spec_by, separators=(",", ":")),
        }

    def close(self) -> None:
        if self.trace is not None:
            self.trace.close()
