"""A verifier's pass trace: one JSON line per verification pass, saying where the verifier's time went.

Turned on with ``cosine worker verifier --trace-passes FILE`` (appends). Each line holds the wall time
(``t``), what the pass was (requests held and verified, each verified draft's depth, the forward's time)
and, for every cumulative counter the verifier hands over, its growth since the previous line: time spent
prefilling admitted requests, in Redis calls and serialisation, in blocking reads and in scheduling, and the
token slots its forwards computed and fed. A pass's forward is not the whole of a round: on the demo zoo
at the peak of a burst of arrivals, prefilling them took a quarter of the verifier's time.
"""

from __future__ import annotations

import json
import time


class PassTrace:
    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "a", buffering=1, encoding="utf-8")  # line-buffered: a killed worker loses nothing
        self._last: dict[str, float] = {}

    def record(self, counters: dict[str, float], **fields) -> None:
        """Write one line: ``fields`` as given, and each of ``counters`` (cumulative) as its growth since the
        previous line (the whole value on the first)."""
        grown = {name: round(value - self._last.get(name, 0.0), 3) for name, value in counters.items()}
        self._last = dict(counters)
        self._file.write(json.dumps({"t": round(time.time(), 4), **fields, **grown}) + "\n")

    def close(self) -> None:
        self._file.close()
