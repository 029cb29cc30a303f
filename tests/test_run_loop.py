"""The one loop every worker runs: it survives a lost broker, a lost consumer group and its own bugs."""

from __future__ import annotations

import threading

import redis

from cosine.service.run_loop import run_forever


def test_the_loop_survives_the_broker_and_bugs_then_drains_and_stops():
    stop = threading.Event()
    seen: list[str] = []
    faults = iter([redis.ConnectionError("gone"), redis.ResponseError("NOGROUP No such key 'x'"),
                   redis.ResponseError("WRONGTYPE"), ValueError("a bug"), None, None])

    def step():
        fault = next(faults, None)
        seen.append(type(fault).__name__ if fault else "step")
        if fault is not None:
            raise fault
        if seen.count("step") == 2:
            stop.set()

    run_forever("test", stop, step, on_start=lambda: seen.append("start"), drain=lambda: seen.append("drain"),
                on_stop=lambda: seen.append("stopped"))
    assert seen == ["start", "ConnectionError", "ResponseError", "start", "ResponseError", "ValueError", "step",
                    "step", "drain", "stopped"], "NOGROUP (only) runs on_start again; every fault is survived"


def test_a_failing_start_is_retried_and_on_stop_runs_even_when_the_step_escapes():
    stop = threading.Event()
    starts = []

    def on_start():
        starts.append(1)
        if len(starts) == 1:
            raise redis.TimeoutError("slow broker")

    stopped = []

    def step():
        raise KeyboardInterrupt

    try:
        run_forever("test", stop, step, on_start=on_start, on_stop=lambda: stopped.append(1))
    except KeyboardInterrupt:
        pass
    assert len(starts) == 2 and stopped == [1]


def test_pace_spaces_steps_that_succeed():
    stop = threading.Event()
    times: list[float] = []
    import time

    def step():
        times.append(time.monotonic())
        if len(times) == 3:
            stop.set()

    run_forever("test", stop, step, pace_s=0.05)
    assert times[2] - times[0] >= 0.09


def test_on_reconnect_runs_before_each_step_that_follows_a_lost_connection():
    stop = threading.Event()
    seen: list[str] = []
    faults = iter([None, redis.ConnectionError("gone"), redis.TimeoutError("still gone"), None, None])

    def step():
        fault = next(faults, None)
        seen.append(type(fault).__name__ if fault else "step")
        if fault is not None:
            raise fault
        if seen.count("step") == 3:
            stop.set()

    run_forever("test", stop, step, on_reconnect=lambda: seen.append("reconnect"))
    assert seen == ["step", "ConnectionError", "reconnect", "TimeoutError", "reconnect", "step", "step"]
