"""Pieces every worker loop shares: reconnect backoff and graceful shutdown on SIGTERM/SIGINT."""

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
