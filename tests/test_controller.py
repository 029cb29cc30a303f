"""The controller process against a real Redis: sampling, publishing, restarts, the lease, ControlView, CLI."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from cosine.broker import RedisSettings, Streams, connect, now_ms
from cosine.cli import cli
from cosine.deployment import Deployment, WorkerSpec
from cosine.keys import DRAFTERS_GROUP, VERIFIERS_GROUP, Keys
from cosine.local_redis import LocalRedis, free_port
from cosine.policy.control_policy import ControlDecision, ControlPolicy, ControlSettings
from cosine.service.control_view import ControlView
from cosine.service.controller_service import LOCK_NAME, ControllerService, ControllerSettings
from cosine.status import collect_status, format_status, format_timeline

from .pipeline_helpers import wait_for

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def srv():
    with LocalRedis() as s:
        yield s
        s.kill()  # a throwaway server: no need for a graceful SHUTDOWN


@pytest.fixture
def prefix():
    return f"ctl{next(_prefixes)}"


def settings(url, prefix, **kw) -> RedisSettings:
    return RedisSettings(url=url, prefix=prefix, **kw)


def controller(url, prefix, hysteresis=1, **kw) -> ControllerService:
    kw.setdefault("interval_ms", 50)
    return ControllerService(settings(url, prefix), ControllerSettings(**kw),
                             ControlPolicy(ControlSettings(k_max_default=4, hysteresis_samples=hysteresis, drift_samples=1000)))


def streams(url, prefix) -> Streams:
    return Streams(connect(settings(url, prefix)), Keys(prefix))


def fill(s: Streams, stream: str, group: str, n: int, read: int = 0, age_ms: int = 0) -> None:
    """``n`` entries (the first ``age_ms`` old), ``read`` of them delivered and left pending."""
    s.ensure_group(stream, group)
    base = now_ms() - age_ms
    for i in range(n):
        s.r.xadd(stream, {"d": b"x"}, id=f"{base + i}-0")
    if read:
        s.r.xreadgroup(group, "c", {stream: ">"}, count=read)


def beat(s: Streams, wid: str, role: str, busy: float = 0.1, active: int = 4, **extra) -> None:
    info = {"role": role, "busy": busy, "active": active, **extra}
    if role == "verifier":
        info.setdefault("capacity", 32)
    s.heartbeat(wid, info)


def log_entries(s: Streams) -> list[dict]:
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in s.r.xrange(s.keys.control_log)]


# -- sampling and publishing ------------------------------------------------------------------------------
def test_sample_reads_depths_ages_and_loads(srv, prefix):
    s = streams(srv.url, prefix)
    k = s.keys
    fill(s, k.requests, VERIFIERS_GROUP, 3, read=1, age_ms=1000)
    fill(s, k.verify("v0"), VERIFIERS_GROUP, 2, read=2, age_ms=500)
    fill(s, k.draft("d0"), DRAFTERS_GROUP, 5, read=0, age_ms=800)
    fill(s, k.draft("dead"), DRAFTERS_GROUP, 50)
    beat(s, "v0", "verifier", busy=0.25, active=3)
    beat(s, "d0", "drafter", busy=0.5)
    s.r.zadd(k.workers, {"dead": now_ms() - 60_000})
    s.r.hset(k.worker("dead"), mapping={"role": "drafter"})

    inputs = controller(srv.url, prefix).sample()
    req = inputs.requests
    assert (req.stream, req.lag, req.pending) == (k.requests, 2, 1)
    assert 900 <= req.oldest_pending_ms < 5000 and 900 <= req.oldest_waiting_ms < 5000
    [ver] = inputs.verifies
    assert (ver.stream, ver.lag, ver.pending) == (k.verify("v0"), 0, 2) and ver.oldest_pending_ms >= 400
    [dr] = inputs.drafts  # the dead drafter's stream is not sampled
    assert (dr.stream, dr.lag, dr.pending, dr.oldest_pending_ms) == (k.draft("d0"), 5, 0, 0.0)
    assert dr.oldest_waiting_ms >= 700
    [v] = inputs.verifiers
    [d] = inputs.drafters
    assert (v.worker_id, v.busy, v.active, v.capacity) == ("v0", 0.25, 3, 32)
    assert (d.worker_id, d.role, d.busy) == ("d0", "drafter", 0.5)
    assert abs(inputs.at_ms - now_ms()) < 2000


def test_missing_streams_and_null_lag(srv, prefix):
    s = streams(srv.url, prefix)
    beat(s, "v0", "verifier")  # no verify stream yet
    fill(s, s.keys.requests, VERIFIERS_GROUP, 4, read=1)
    undelivered = s.r.xrange(s.keys.requests)[-1][0]
    s.r.xdel(s.keys.requests, undelivered)  # Redis 7.0 reports lag NULL now
    assert s.r.xinfo_groups(s.keys.requests)[0]["lag"] is None
    inputs = controller(srv.url, prefix).sample()
    assert inputs.requests.lag == 2 and inputs.requests.lag_estimated  # XLEN 3 - pending 1
    assert inputs.verifies[0].lag == 0 and inputs.verifies[0].pending == 0


def test_busy_is_measured_over_recent_heartbeats(srv, prefix):
    s = streams(srv.url, prefix)
    c = controller(srv.url, prefix)
    beat(s, "v0", "verifier", busy=0.1, busy_s=1.0, uptime_s=10.0)
    assert c.sample().verifiers[0].busy == 0.1  # one heartbeat: the lifetime share
    beat(s, "v0", "verifier", busy=0.18, busy_s=1.9, uptime_s=11.0)
    assert c.sample().verifiers[0].busy == pytest.approx(0.9)
    beat(s, "v0", "verifier", busy=0.1, busy_s=0.1, uptime_s=1.0)  # restarted worker: history starts over
    assert c.sample().verifiers[0].busy == 0.1


def test_first_step_publishes_defaults_with_a_log_entry(srv, prefix):
    s = streams(srv.url, prefix)
    beat(s, "v0", "verifier", busy=0.7)
    c = controller(srv.url, prefix)
    assert c.hold_lease()
    stored = ControlDecision.from_dict(s.r.hgetall(s.keys.control))
    assert stored.version == 1 and stored.controls() == c.policy.initial().controls()
    raw = {k.decode(): v.decode() for k, v in s.r.hgetall(s.keys.control).items()}
    assert raw["controller"] == "controller" and raw["schema"] == "1"
    assert set(raw) >= {"version", "k_min", "k_max", "max_cooperating", "verifier_max_batch", "verifier_token_cap",
                        "pressure", "reason", "at_ms"}
    [entry] = log_entries(s)
    assert entry["kind"] == "start" and entry["version"] == "1" and "started" in entry["reason"]
    inputs = json.loads(entry["inputs"])
    assert inputs["verifiers"][0]["worker_id"] == "v0" and inputs["requests"]["stream"] == s.keys.requests
    c.step()  # unchanged: no new version, and no log entry before log_every_s
    assert len(log_entries(s)) == 1 and s.r.hget(s.keys.control, "version") == b"1"


def test_idle_verifier_leads_to_a_logged_decision(srv, prefix):
    s = streams(srv.url, prefix)
    beat(s, "v0", "verifier", busy=0.05, active=2)
    beat(s, "d0", "drafter", busy=0.05)
    c = controller(srv.url, prefix, hysteresis=2)
    c.hold_lease()
    first = c.decision
    c.step()
    assert c.decision is first
    d = c.step()
    assert d.version == 2 and d.k_max == first.k_max + 1 and d.pressure < 0
    assert ControlDecision.from_dict(s.r.hgetall(s.keys.control)) == d
    entry = log_entries(s)[-1]
    assert entry["kind"] == "decision" and entry["version"] == "2" and "idle" in entry["reason"]
    sig = json.loads(entry["signals"])
    assert sig["verifier_busy"] == 0.05 and sig["drafters"] == 1
    assert json.loads(entry["inputs"])["drafters"][0]["worker_id"] == "d0"
    snap = collect_status(settings(srv.url, prefix), timeline=5)
    assert [e["version"] for e in snap["timeline"]][-2:] == ["1", "2"]  # oldest first, samples left out
    assert "controller timeline" in format_timeline(snap) and "idle" in format_timeline(snap)


def test_unchanged_decisions_are_logged_now_and_then(srv, prefix):
    s = streams(srv.url, prefix)
    c = controller(srv.url, prefix, log_every_s=0.0)
    c.hold_lease()
    for _ in range(3):
        c.step()
    kinds = [e["kind"] for e in log_entries(s)]
    assert kinds == ["start", "sample", "sample", "sample"]
    assert s.r.hget(s.keys.control, "version") == b"1"


def test_a_restarted_controller_continues_the_version(srv, prefix):
    s = streams(srv.url, prefix)
    beat(s, "v0", "verifier", busy=0.05, active=2)
    beat(s, "d0", "drafter", busy=0.05)
    a = controller(srv.url, prefix)
    a.hold_lease()
    a.step()
    a.step()
    assert a.decision.version == 3
    a.release()
    assert s.r.get(s.keys.lock(LOCK_NAME)) is None
    b = controller(srv.url, prefix)
    assert b.hold_lease()
    assert b.decision == a.decision  # continues from the stored decision, no new version
    assert s.r.hget(s.keys.control, "version") == b"3"
    d = b.step()
    assert d.version == 4 and d.k_max == a.decision.k_max + 1
    kinds = [e["kind"] for e in log_entries(s)]
    assert kinds == ["start", "decision", "decision", "stop", "start", "decision"]


def test_a_lost_control_key_is_republished_with_the_next_version(srv, prefix):
    s = streams(srv.url, prefix)
    c = controller(srv.url, prefix)
    c.hold_lease()
    s.r.delete(s.keys.control)
    c.step()
    assert s.r.hget(s.keys.control, "version") == b"2"


def test_a_foreign_decision_is_adopted_not_overwritten(srv, prefix):
    s = streams(srv.url, prefix)
    c = controller(srv.url, prefix)
    c.hold_lease()
    foreign = ControlDecision(9, 1, 2, 1, 32, 2048, 0.5, "someone else")
    s.r.hset(s.keys.control, mapping=foreign.to_dict())
    c.step()
    assert c.decision == foreign and s.r.hget(s.keys.control, "version") == b"9"


def test_only_one_controller_is_active(srv, prefix):
    a = controller(srv.url, prefix)
    b = controller(srv.url, prefix)
    assert a.hold_lease() and not b.hold_lease()
    assert a.hold_lease() and not b.hold_lease()  # renewing keeps it
    a.release()
    assert b.hold_lease() and b.decision.version == 1


def test_run_heartbeats_hands_over_on_stop_and_workers_keep_the_decision(srv, prefix):
    s = streams(srv.url, prefix)
    view = ControlView(s.r, s.keys, refresh_ms=0)
    assert view.current() is None  # nothing published yet
    a = controller(srv.url, prefix, worker_id="ctl-a", heartbeat_interval_s=0.05)
    b = controller(srv.url, prefix, worker_id="ctl-b", heartbeat_interval_s=0.05)
    stop_a, stop_b = threading.Event(), threading.Event()
    ta = threading.Thread(target=a.run, args=(stop_a,))
    ta.start()
    wait_for(lambda: view.current() is not None, 5, what="the first decision")
    tb = threading.Thread(target=b.run, args=(stop_b,))
    tb.start()
    try:
        wait_for(lambda: s.live_workers("controller").get("ctl-b", {}).get("state") == "standby", 5,
                 what="a standby")
        assert s.live_workers("controller")["ctl-a"]["state"] == "active"
        stop_a.set()
        ta.join(5)
        assert not ta.is_alive()
        assert view.current().version == 1  # the controller stopped: workers keep its decision
        wait_for(lambda: b.leader, 5, what="the standby to take over")
        wait_for(lambda: s.live_workers("controller").get("ctl-b", {}).get("state") == "active", 5,
                 what="the standby's heartbeat")
        wait_for(lambda: "ctl-a" not in s.live_workers(), 5, what="the stopped controller to deregister")
    finally:
        stop_a.set()
        stop_b.set()
        ta.join(5)
        tb.join(5)
    kinds = [e["kind"] for e in log_entries(s) if e["kind"] != "sample"]
    assert kinds == ["start", "stop", "start", "stop"]
    assert view.current().version == 1


# -- ControlView ------------------------------------------------------------------------------------------
def test_control_view_refreshes_only_on_new_versions(srv, prefix):
    s = streams(srv.url, prefix)
    view = ControlView(s.r, s.keys, refresh_ms=100)
    assert view.current(now=0.0) is None
    d1 = ControlDecision(1, 1, 4, 2, 32, 2048, 0.0, "defaults")
    s.r.hset(s.keys.control, mapping=d1.to_dict())
    assert view.current(now=0.05) is None  # not yet time to look again
    assert view.current(now=0.1) == d1 and view.reads == 1
    assert view.current(now=0.3) == d1 and view.reads == 1  # same version: no re-read
    d2 = ControlDecision(2, 1, 5, 3, 32, 2048, -0.5, "idle")
    s.r.hset(s.keys.control, mapping=d2.to_dict())
    assert view.current(now=0.35) == d1
    assert view.current(now=0.4) == d2 and view.reads == 2
    s.r.hset(s.keys.control, "k_max", "banana")  # malformed: keep the last good one
    s.r.hset(s.keys.control, "version", "3")
    assert view.current(now=1.0) == d2 and view.last_error
    s.r.delete(s.keys.control)  # gone (Redis lost it): keep the last one
    assert view.current(now=2.0) == d2
    d1b = ControlDecision(1, 1, 3, 1, 32, 2048, 0.3, "a new controller on an empty Redis")
    s.r.hset(s.keys.control, mapping=d1b.to_dict())
    assert view.current(now=3.0) == d1b  # any version change counts, even backwards


def test_control_view_keeps_the_decision_when_redis_is_unreachable():
    with LocalRedis() as own:
        r = connect(RedisSettings(url=own.url, socket_timeout_s=1.0))
        keys = Keys("cosine")
        d = ControlDecision(4, 1, 6, 3, 40, 2560, -0.5, "idle")
        r.hset(keys.control, mapping=d.to_dict())
        view = ControlView(r, keys, refresh_ms=0)
        assert view.current() == d
        own.kill()
        t0 = time.monotonic()
        assert view.current() == d and view.last_error
        assert time.monotonic() - t0 < 5


@pytest.mark.slow
def test_the_controller_survives_a_redis_restart_without_data():
    with LocalRedis() as own:
        c = ControllerService(RedisSettings(url=own.url, socket_timeout_s=1.0), ControllerSettings(interval_ms=50))
        s = Streams(connect(RedisSettings(url=own.url)), Keys("cosine"))
        stop = threading.Event()
        t = threading.Thread(target=c.run, args=(stop,))
        t.start()
        try:
            wait_for(lambda: s.r.hget(s.keys.control, "version") == b"1", 5, what="the first decision")
            own.kill()  # a crash without persistence: the control hash and the lock are gone
            time.sleep(0.3)
            own.start()
            wait_for(lambda: s.r.hget(s.keys.control, "version") == b"2", 15, what="the republished decision")
        finally:
            stop.set()
            t.join(10)
        assert not t.is_alive()


# -- status, CLI, deployment ------------------------------------------------------------------------------
def test_status_shows_the_decision(srv, prefix):
    rs = settings(srv.url, prefix)
    assert "no decision" in format_status(collect_status(rs))
    c = controller(srv.url, prefix)
    c.hold_lease()
    snap = collect_status(rs)
    assert snap["control"]["version"] == "1"
    assert "control v1 by controller" in format_status(snap)
    assert not [st for st in snap["streams"] if st["stream"].endswith(":controller")]


@pytest.mark.parametrize("args", [["controller"], ["up"]])
def test_help(args):
    result = CliRunner().invoke(cli, args + ["--help"])
    assert result.exit_code == 0, result.output
    assert "--interval-ms" in result.output or "--controller" in result.output


def test_deployment_command_for_a_controller():
    dep = Deployment([], redis_url="redis://h:1/0", prefix="p")
    cmd = dep.command(WorkerSpec("controller", "controller", ["--interval-ms", "100"]))
    assert cmd[1:4] == ["-m", "cosine.cli", "controller"]
    assert cmd[4:] == ["--redis-url", "redis://h:1/0", "--prefix", "p", "--name", "controller", "--interval-ms", "100"]


@pytest.mark.slow
def test_controller_process_publishes_and_stops_on_sigterm(srv, prefix):
    s = streams(srv.url, prefix)
    proc = subprocess.Popen([sys.executable, "-m", "cosine.cli", "controller", "--redis-url", srv.url,
                             "--prefix", prefix, "--name", "ctl", "--interval-ms", "100"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: s.r.hget(s.keys.control, "version") is not None, 20, what="the first decision")
        up = time.monotonic()
        wait_for(lambda: "ctl" in s.live_workers("controller"), 2, what="the controller's heartbeat")
        assert time.monotonic() - up < 2
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "stopped at control version 1" in out
    assert s.r.get(s.keys.lock(LOCK_NAME)) is None and "ctl" not in s.live_workers()
    assert [e["kind"] for e in log_entries(s)] == ["start", "stop"]


@pytest.mark.slow
def test_a_deployment_starts_a_controller(srv, prefix):
    dep = Deployment([WorkerSpec("controller", "controller", ["--interval-ms", "100"])], redis_url=srv.url,
                     prefix=prefix)
    with dep:
        s = streams(srv.url, prefix)
        wait_for(lambda: s.live_workers("controller")["controller"].get("state") == "active", 5, what="active")
        wait_for(lambda: s.r.hget(s.keys.control, "version") == b"1", 5, what="the first decision")
    assert dep.procs["controller"].returncode == 0


def test_a_view_on_a_redis_that_never_answered():
    r = connect(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=1.0))  # nobody there
    view = ControlView(r, Keys("cosine"), refresh_ms=0)
    assert view.current() is None and view.last_error
