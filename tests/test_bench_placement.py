"""Where the benchmarks run things: CPU layouts, pinning this process, the workers and Redis a deployment
starts, and the verifier's pass breakdown read from its heartbeats. No timings."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from cosine.bench.counters import BREAKDOWN, pass_breakdown, pipeline_counters
from cosine.bench.pinning import (
    EQUAL,
    NODE,
    allowed_cpus,
    format_cpus,
    parse_cpu_list,
    parse_layout,
    pinned,
    pinned_command,
    view_cpus,
    views,
)
from cosine.errors import InvalidParameterError

TWO_CORES = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")


def test_cpu_lists_parse_and_format_with_ranges():
    assert parse_cpu_list("0,2,4-6") == {0, 2, 4, 5, 6}
    assert format_cpus({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert parse_cpu_list(format_cpus({3, 1, 2, 9})) == {1, 2, 3, 9}
    for bad in ("", "a", "1-", "0,,1", "3-1"):
        with pytest.raises(InvalidParameterError, match="cpus"):
            parse_cpu_list(bad)


@TWO_CORES
def test_layouts_name_both_roles_on_separate_available_cores():
    first, second = sorted(allowed_cpus())[:2]
    layout = parse_layout([f"verifier={first}", f"drafter={second}"])
    assert layout == {"verifier": {first}, "drafter": {second}} == parse_layout([])  # the default: first two
    assert view_cpus(layout, NODE) == {first} and view_cpus(layout, EQUAL) == {first, second}
    assert views(layout) == (NODE, EQUAL)
    assert parse_layout(["none"]) is None and views(None) == (EQUAL,) and view_cpus(None, EQUAL) == allowed_cpus()
    for bad, why in ((["verifier=0"], "no cores given"), ([f"verifier={first}", f"drafter={first}"], "overlap"),
                     (["verifier=0", "drafter=4096"], "not available"), (["gpu=0", "drafter=1"], "ROLE=CPUS")):
        with pytest.raises(InvalidParameterError, match=why):
            parse_layout(bad)
    with pytest.raises(InvalidParameterError, match="node-emulated"):
        view_cpus(None, NODE)


@TWO_CORES
def test_pinned_moves_every_thread_of_this_process_and_restores_them():
    before, threads = allowed_cpus(), torch.get_num_threads()
    one = {min(before)}
    with pinned(one):
        tids = os.listdir("/proc/self/task")
        assert all(os.sched_getaffinity(int(t)) == one for t in tids if os.path.exists(f"/proc/self/task/{t}"))
        assert torch.get_num_threads() == 1
    assert allowed_cpus() == before and torch.get_num_threads() == threads


@TWO_CORES
def test_a_pinned_command_runs_on_its_cores_from_the_start():
    core = max(allowed_cpus())
    out = subprocess.run(pinned_command([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                                        {core}), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"[{core}]"


def test_pass_breakdown_splits_wall_time_into_shares_that_add_up():
    v0 = {"busy_s": 1.0, "admit_s": 0.1, "blocked_s": 2.0, "draft_wait_s": 0.5, "messaging_s": 0.2,
          "scheduling_s": 0.05, "uptime_s": 10.0}
    v1 = {"busy_s": 4.1, "admit_s": 0.3, "blocked_s": 3.5, "draft_wait_s": 1.3, "messaging_s": 0.6,
          "scheduling_s": 0.15, "uptime_s": 15.0}
    b = pass_breakdown(v0, v1, wall=5.0)
    assert b["forward"] == pytest.approx(2.9 / 5)  # forwards less prefills
    assert b["blocked_on_drafts"] == pytest.approx(0.8 / 5) and b["messaging"] == pytest.approx(0.4 / 5)
    # untimed = 5 - 3.1 - 1.5 - 0.4 - 0.1 = -0.1 -> 0; overhead = prefill 0.2 + scheduling 0.1
    assert b["overhead"] == pytest.approx(0.3 / 5) and b["prefill"] == pytest.approx(0.2 / 5)
    assert sum(b[k] for k in BREAKDOWN) == pytest.approx(1.0, abs=1e-3)
    assert pass_breakdown({}, v1, 5.0) is None  # a heartbeat missing (e.g. an old verifier): no breakdown
    row = pipeline_counters({"verifier-0": {**v0, "rounds": 10}}, {"verifier-0": {**v1, "rounds": 110}}, 5.0)
    assert row["forward_ms_per_pass"] == pytest.approx(29.0) and row["verify_ms_per_round"] == pytest.approx(31.0)
    assert row["verifier_pass"] == b and row["drafter_busy"] == 0.0


def cpus_allowed_list(pid: int) -> str:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    return next(line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith("Cpus_allowed_list"))


@pytest.mark.slow
@TWO_CORES
def test_a_deployment_pins_the_workers_and_the_redis_it_starts():
    """A controller (no models: quick to start) pinned to one core, Redis to another: every thread of each
    process stays there, as the OS reports it."""
    from cosine.deployment import Deployment, WorkerSpec

    first, second = sorted(allowed_cpus())[:2]
    spec = WorkerSpec("controller", "controller-0", cpus=frozenset({second}))
    with Deployment([spec], redis_cpus=frozenset({first})) as dep:
        controller, redis_pid = dep.procs["controller-0"].pid, dep.local.proc.pid
        assert cpus_allowed_list(controller) == str(second)
        for pid, core in ((controller, second), (redis_pid, first)):
            assert {format_cpus(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{pid}/task")} == {str(core)}
