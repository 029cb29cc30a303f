"""What workers use to read the controller's decisions (``{prefix}:control``).

A worker calls :meth:`ControlView.current` once per round; it costs nothing most of the time: at most every
``refresh_ms`` it reads the hash's ``version`` (one HGET) and re-reads the whole hash only when the version
differs from the one it holds (a restarted controller that lost its key starts again lower: any change
counts). A Redis error, a missing key or a malformed hash keeps the last decision, so workers go on with
what the controller last said when it (or Redis) is gone. ``None`` means no controller ever published:
use your own settings.
"""

from __future__ import annotations

import logging
import time

import redis

from cosine import defaults
from cosine.keys import Keys
from cosine.policy.control_policy import ControlDecision

log = logging.getLogger(__name__)


class ControlView:
    def __init__(self, r: redis.Redis, keys: Keys, refresh_ms: float = defaults.CONTROL_REFRESH_MS) -> None:
        self.r = r
        self.keys = keys
        self.refresh_s = max(0.0, refresh_ms / 1000)
        self.decision: ControlDecision | None = None
        self.last_error: str | None = None  # why the last refresh failed, None when it worked
        self.reads = 0  # full re-reads of the hash (a new version arrived)
        self._next_check = float("-inf")

    @property
    def version(self) -> int | None:
        return None if self.decision is None else self.decision.version

    def current(self, now: float | None = None) -> ControlDecision | None:
        """The latest decision (refreshed at most every ``refresh_ms``; ``now`` in monotonic seconds)."""
        now = time.monotonic() if now is None else now
        if now < self._next_check:
            return self.decision
        self._next_check = now + self.refresh_s
        try:
            raw = self.r.hget(self.keys.control, "version")
            if raw is None:  # never published, or Redis lost the key: keep what we have
                return self.decision
            if self.decision is None or int(raw) != self.decision.version:
                new = ControlDecision.from_dict(self.r.hgetall(self.keys.control))
                if self.decision is None or new.version != self.decision.version:
                    log.info("control v%d applied: k %d..%d, cooperating %d, batch %d (%d tokens), pressure %+.1f",
                             new.version, new.k_min, new.k_max, new.max_cooperating, new.verifier_max_batch,
                             new.verifier_token_cap, new.pressure)
                self.decision = new
                self.reads += 1
            self.last_error = None
        except (redis.RedisError, OSError, ValueError) as exc:
            self.last_error = str(exc)
            log.debug("control refresh failed, keeping version %s: %s", self.version, exc)
        return self.decision
