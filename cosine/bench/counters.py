"""What the workers' heartbeats say about a benchmark run: busy fractions, messaging, and the verifier's
pass breakdown.

Workers publish their counters every ``HEARTBEAT_INTERVAL_S`` (0.5 s), so a snapshot read just after a
run may predate its last passes. :func:`fresh_counters` waits for a heartbeat published after it was
called: read before a run and after it, the two snapshots bracket the run, and what lies between them
besides the run is the verifier idling (blocked with nothing to verify), which the breakdown reports as
idle.

The breakdown splits the run's wall time on the verifier into shares that add up to 1:

* ``forward``            — target forwards of verify passes (``busy_s`` less prefills);
* ``blocked_on_drafts``  — blocking reads while holding requests: waiting for drafts on their way
                           (``draft_wait_s``);
* ``messaging``          — Redis calls and (de)serialisation on the round path (``messaging_s``);
* ``overhead``           — the rest of a round's work: prefilling admitted requests, scheduling, and the
                           Python between the timed spans (uptime less every timed span);
* ``idle``               — what is left: blocked with no request to serve (between a closed loop's
                           requests, before the first arrives).

A heartbeat taken during a blocking read counts the read's elapsed part in the uptime but not yet in
``blocked_s``; the verifier idles in reads of ``VERIFIER_IDLE_BLOCK_MS`` (50 ms) before and after a run, so
``overhead`` may hold up to two such partial reads: 0.1 s at most, 1-2% of a run of several seconds.
"""

from __future__ import annotations

import time

from cosine.defaults import HEARTBEAT_INTERVAL_S

BREAKDOWN = ("forward", "blocked_on_drafts", "messaging", "overhead", "idle")


def worker_counters(url: str) -> dict[str, dict]:
    """Every live worker's last heartbeat: ``{name: info}``."""
    from cosine.broker import RedisSettings, Streams, connect
    from cosine.keys import Keys

    s = Streams(connect(RedisSettings(url=url)), Keys())
    return s.live_workers()


def fresh_counters(url: str, names: tuple[str, ...] = ("verifier-0",),
                   timeout: float = 4 * HEARTBEAT_INTERVAL_S) -> dict[str, dict]:
    """:func:`worker_counters` once each of ``names`` has published a heartbeat since this call (its uptime
    moved); after ``timeout`` (a worker gone quiet), whatever is there."""
    first = worker_counters(url)
    deadline = time.monotonic() + timeout
    while True:
        now = worker_counters(url)
        if all(now.get(n, {}).get("uptime_s") != first.get(n, {}).get("uptime_s") for n in names) \
                or time.monotonic() > deadline:
            return now
        time.sleep(0.02)


def delta(before: dict, after: dict, key: str) -> float:
    return float(after.get(key, 0) or 0) - float(before.get(key, 0) or 0)


def pass_breakdown(v0: dict, v1: dict, wall: float) -> dict[str, float] | None:
    """The verifier's time between two heartbeats as shares of a run's ``wall`` seconds (see the module's
    docstring); None without both heartbeats."""
    if not v0 or not v1 or wall <= 0:
        return None
    d = {k: delta(v0, v1, k) for k in ("busy_s", "admit_s", "blocked_s", "draft_wait_s", "messaging_s",
                                       "scheduling_s", "uptime_s")}
    untimed = max(0.0, d["uptime_s"] - d["busy_s"] - d["blocked_s"] - d["messaging_s"] - d["scheduling_s"])
    shares = {
        "forward": (d["busy_s"] - d["admit_s"]) / wall,
        "blocked_on_drafts": d["draft_wait_s"] / wall,
        "messaging": d["messaging_s"] / wall,
        "overhead": (d["admit_s"] + d["scheduling_s"] + untimed) / wall,
    }
    shares["idle"] = max(0.0, 1.0 - sum(shares.values()))
    out = {k: round(v, 4) for k, v in shares.items()}
    out["prefill"] = round(d["admit_s"] / wall, 4)  # of overhead: prefilling admitted requests
    out["scheduling"] = round(d["scheduling_s"] / wall, 4)  # of overhead: choosing what to verify
    return out


def pipeline_counters(before: dict[str, dict], after: dict[str, dict], wall: float,
                      verifier: str = "verifier-0", drafter: str = "drafter-0") -> dict:
    """The counters a pipeline row carries, from heartbeats read before and after a run of ``wall`` s."""
    v0, v1 = before.get(verifier, {}), after.get(verifier, {})
    d0, d1 = before.get(drafter, {}), after.get(drafter, {})
    busy, messaging, rounds = delta(v0, v1, "busy_s"), delta(v0, v1, "messaging_s"), delta(v0, v1, "rounds")
    return {
        "verifier_busy": round(busy / wall, 3),
        "drafter_busy": round(delta(d0, d1, "busy_s") / wall, 3),
        "messaging_share_of_step": round(messaging / busy, 4) if busy else None,
        "messaging_ms_per_round": round(1000 * messaging / rounds, 3) if rounds else None,
        "verify_ms_per_round": round(1000 * busy / rounds, 3) if rounds else None,  # prefills included
        "forward_ms_per_pass": round(1000 * (busy - delta(v0, v1, "admit_s")) / rounds, 3) if rounds else None,
        "late_drafts": int(delta(v0, v1, "late_drafts")),
        "stale_drafts": int(delta(v0, v1, "stale_drafts")),
        "lookahead_hits": int(delta(d0, d1, "lookahead_hits")),
        "lookahead_misses": int(delta(d0, d1, "lookahead_misses")),
        "control_version": int(v1.get("control_version", 0) or 0),
        "verifier_pass": pass_breakdown(v0, v1, wall),
    }
