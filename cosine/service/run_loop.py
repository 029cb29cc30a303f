"""The loop every worker runs, and the process's signals.

:func:`run_forever` calls a worker's ``step`` until asked to stop and survives the broker: a lost connection
is retried forever with exponential backoff, a ``NOGROUP`` (Redis restarted without its data, or failed over)
runs the worker's ``on_start`` again to recreate its consumer groups, and any other error is logged and backed
off from, so one bad message or bug never takes a worker (and the requests it holds) down. Verifier, drafter,
controller and the drafter's vote server are each a ``step`` in this loop.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

import redis

from cosine import defaults
from cosine.broker import explain_connection_error, is_nogroup

log = logging.getLogger(__name__)


class Backoff:
    """Exponential backoff for a lost broker: workers retry forever, logging the first and every 20th try."""

    def __init__(self, low: float = defaults.RECONNECT_BACKOFF_S[0], high: float = defaults.RECONNECT_BACKOFF_S[1]):
        self.low, self.high = low, high
        self.delay = low
        self.tries = 0

    def wait(self, stop: threading.Event, message: str) -> None:
        self.tries += 1
        if self.tries == 1 or self.tries % 20 == 0:
            log.warning("%s; retrying (attempt %d)", message, self.tries)
        stop.wait(self.delay)
        self.delay = min(self.high, self.delay * 2)

    def reset(self) -> None:
        if self.tries:
            log.info("broker reachable again after %d attempts", self.tries)
        self.delay = self.low
        self.tries = 0


def run_forever(name: str, stop: threading.Event, step: Callable[[], object], *,
                on_start: Callable[[], object] | None = None, drain: Callable[[], object] | None = None,
                on_stop: Callable[[], object] | None = None, heartbeat=None, pace_s: float = 0.0,
                on_reconnect: Callable[[], object] | None = None) -> None:
    """Run ``step`` until ``stop`` is set.

    ``on_start`` runs before the first step and again after a ``NOGROUP``; ``pace_s`` spaces steps that
    succeed (a controller's interval); ``drain`` runs once the loop ends on ``stop`` (finish what is held);
    ``on_stop`` always runs last; ``on_reconnect`` runs before the first step after a lost connection (the
    broker may have restarted, or failed over to a replica that lacks the last writes). ``heartbeat`` (a
    :class:`~cosine.service.heartbeat.Heartbeat`) beats once before the loop, then from its thread until the
    end; a drain request it sees sets ``stop``."""
    if heartbeat is not None:
        heartbeat.on_drain = stop.set
        heartbeat.beat()
        heartbeat.start()
    backoff = Backoff()
    started = False
    reconnected = False
    reached = False  # whether a step ever succeeded (before that, a TLS mismatch is the likelier cause)
    try:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                if not started:
                    if on_start is not None:
                        on_start()
                    started = True
                if reconnected:
                    if on_reconnect is not None:
                        on_reconnect()
                    reconnected = False
                step()
                reached = True
                backoff.reset()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                reconnected = True
                backoff.wait(stop, f"{name}: Redis unavailable ({explain_connection_error(exc, first=not reached)})")
                continue
            except redis.ResponseError as exc:
                if is_nogroup(exc):
                    log.warning("%s: consumer groups vanished (Redis lost its data?): recreating them", name)
                    started = False
                else:
                    log.exception("%s: Redis refused a command", name)
                backoff.wait(stop, f"{name}: {exc}")
                continue
            except Exception:  # a bug must not take the worker, and what it holds, down: log, back off, go on
                log.exception("%s: unexpected error in the loop", name)
                backoff.wait(stop, f"{name}: recovering from an unexpected error")
                continue
            if pace_s:
                stop.wait(max(0.0, pace_s - (time.monotonic() - t0)))
        if drain is not None:
            drain()
    finally:
        if on_stop is not None:
            on_stop()
        if heartbeat is not None:
            heartbeat.stop()


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT: the loop finishes its current step and exits cleanly."""
    stop = threading.Event()

    def handler(signum, _frame):
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def exit_on_sigterm() -> None:
    """For a command that owns a deployment (a benchmark, the demo): SIGTERM raises ``SystemExit(143)`` in the
    main thread, so every ``with Deployment(...)`` / ``with LocalRedis()`` unwinds and stops its workers and
    Redis (Python's default on SIGTERM is to die at once, leaving them running). Further SIGTERMs are
    ignored while that cleanup runs; Ctrl-C already unwinds (KeyboardInterrupt)."""

    def handler(signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log.info("received %s: stopping what this command started", signal.Signals(signum).name)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
