"""Pieces every worker loop shares: reconnect backoff and graceful shutdown on SIGTERM/SIGINT; and, for a
command that owns child processes, an exit on SIGTERM that stops them."""

from __future__ import annotations

import logging
import signal
import threading

from cosine import defaults

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
