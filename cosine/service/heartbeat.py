"""Heartbeats from a thread that never waits on model work, on a connection of its own."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

from cosine import defaults
from cosine.broker import Streams

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    """Publishes ``info()`` under the worker's key every ``interval`` seconds until stopped; at each beat it
    also looks for a drain request (``{p}:drain``, set by the dashboard's admin action) and calls ``on_drain``
    once when there is one (the run loop sets it to stop the worker gracefully: it finishes what it holds)."""

    def __init__(
        self,
        streams: Streams,
        worker_id: str,
        info: Callable[[], dict],
        interval: float = defaults.HEARTBEAT_INTERVAL_S,
        inflight: Callable[[], str] | None = None,
    ) -> None:
        """``inflight``: a verifier's requests held (JSON), published beside ``info`` under a key of its own."""
        super().__init__(name=f"heartbeat-{worker_id}", daemon=True)
        self.streams = streams
        self.worker_id = worker_id
        self.info = info
        self.inflight = inflight
        self.interval = interval
        self._stop_event = threading.Event()
        self.failures = 0
        self.on_drain: Callable[[], object] | None = None
        self.drain_reason: str | None = None

    def beat(self) -> None:
        try:
            reason = self.streams.heartbeat(self.worker_id, self.info(), self.inflight() if self.inflight else None)
            if reason is not None and self.on_drain is not None and self.drain_reason is None:
                self.drain_reason = reason
                log.warning("drain requested (%s): finishing what this worker holds, then exiting", reason)
                self.on_drain()
            if self.failures:
                log.info("heartbeat restored after %d failures", self.failures)
            self.failures = 0
        except redis.RedisError as exc:
            self.failures += 1
            if self.failures in (1, 10) or self.failures % 100 == 0:
                log.warning("heartbeat failed (%d in a row): %s", self.failures, exc)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.beat()
            self._stop_event.wait(self.interval)

    def stop(self, forget: bool = True) -> None:
        """Stop beating; ``forget`` removes the worker's registration so others react at once."""
        self._stop_event.set()
        try:
            if forget:
                self.streams.forget_worker(self.worker_id)
            if self.drain_reason is not None:  # done: a worker started again under this id is not drained
                self.streams.r.hdel(self.streams.keys.drain, self.worker_id)
        except redis.RedisError:
            pass
