"""Helpers for tests of the distributed pipeline: real Redis servers and worker processes."""

from __future__ import annotations

import time

from cosine.broker import RedisSettings, Streams, connect
from cosine.deployment import Deployment, WorkerSpec
from cosine.keys import Keys


def deployment(redis_url: str, verifiers: int = 1, drafters: int = 1, log_dir: str | None = None,
               verifier_args: list[str] | None = None, drafter_args: list[str] | None = None,
               prefix: str = "cosine") -> Deployment:
    specs = [WorkerSpec("verifier", f"verifier-{i}", list(verifier_args or [])) for i in range(verifiers)]
    specs += [WorkerSpec("drafter", f"drafter-{i}", list(drafter_args or [])) for i in range(drafters)]
    return Deployment(specs, redis_url=redis_url, prefix=prefix, log_dir=log_dir, device="cpu", dtype="float32")


def streams(url: str, prefix: str = "cosine") -> Streams:
    return Streams(connect(RedisSettings(url=url, prefix=prefix)), Keys(prefix))


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def heartbeat_until(url: str, role: str, worker: str, predicate, timeout: float = 5.0,
                    prefix: str = "cosine") -> dict:
    """A worker's heartbeat once ``predicate`` holds for it. Workers publish their counters every
    HEARTBEAT_INTERVAL_S, so a counter read right after a request finishes may not yet include it."""
    s = streams(url, prefix)

    def current():
        info = s.live_workers(role).get(worker)
        return info if info is not None and predicate(info) else None

    return wait_for(current, timeout, what=f"{worker}'s heartbeat")


def committed_tokens(url: str, request_ids: list[str], prefix: str = "cosine", owner: str | None = None) -> int:
    """Tokens already written to the output streams of these requests (``owner``: their client's secret)."""
    s = streams(url, prefix)
    total = 0
    from cosine.ownership import output_name
    from cosine.protocol import Chunk, decode_entry

    for rid in request_ids:
        for _eid, fields in s.r.xrange(s.keys.out(output_name(rid, owner))):
            total += len(decode_entry(fields, (Chunk,)).token_ids)
    return total
