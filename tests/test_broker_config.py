"""The shipped broker configuration (``broker_config/``), tested as shipped.

A ``redis-server`` is started exactly as the docs say (``redis.conf`` as shipped; only the port, the data folder,
the absolute ``aclfile`` path and ``daemonize`` on the command line; the placeholder passwords of ``users.acl``):
every role is refused what lies outside its rights (``ACL DRYRUN`` plus at least one real refused command per
role) and allowed every command the code issues for it. Then ``cosine up --broker-config broker_config/`` runs a
whole deployment, every worker as its own user: a producer's request matches the target alone, cancel works
under the producer, ``cosine status`` and the dashboard under the dashboard user, and Redis logs no refusal
meanwhile.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest
import redis
from click.testing import CliRunner

from cosine.broker import redact_url
from cosine.broker_config import BrokerConfig, BrokerConfigError, read_passwords, role_url, use_broker_config, user_for
from cosine.errors import RequestCancelledError
from cosine.local_redis import free_port

from .helpers import greedy_divergences

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONF = ROOT / "broker_config" / "redis.conf"
ACL = ROOT / "broker_config" / "users.acl"
PASSWORDS = read_passwords(ACL)


def password(role: str) -> str:
    return PASSWORDS[user_for(role)]


def login(port: int, role: str) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, username=user_for(role), password=password(role),
                       socket_timeout=5)


def wait_up(port: int, proc: subprocess.Popen, log: pathlib.Path, timeout: float = 15.0) -> None:
    admin = login(port, "admin")
    deadline = time.monotonic() + timeout
    while True:
        try:
            if admin.ping():
                return
        except redis.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"redis-server did not start: {log.read_text()[-1500:]}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """redis-server started as the docs say, from another working directory than the repository's."""
    data = tmp_path_factory.mktemp("broker")
    port = free_port()
    cmd = ["redis-server", str(CONF), "--port", str(port), "--dir", str(data), "--aclfile", str(ACL),
           "--daemonize", "no"]
    log = data / "stdout.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=data, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_up(port, proc, log)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def dry(port: int, role: str, *command) -> str:
    """``ACL DRYRUN``'s answer: "OK" or the reason the role would be refused."""
    reply = login(port, "admin").execute_command("ACL", "DRYRUN", user_for(role), *command)
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def refused(port: int, role: str, *command) -> bool:
    return dry(port, role, *command) != "OK"


# -- what each role's code issues (traced with MONITOR over a run; the rare paths read from the code) --------
RID = "0123456789abcdef0123456789abcdef"
COMMON = [("PING",), ("TIME",), ("MULTI",), ("EXEC",)]
HEARTBEAT = [("ZADD", "cosine:workers", "1", "w"), ("ZREM", "cosine:workers", "w"),
             ("HSET", "cosine:worker:w", "role", "x"), ("PEXPIRE", "cosine:worker:w", "1000"),
             ("DEL", "cosine:worker:w"), ("HGET", "cosine:drain", "w"), ("HDEL", "cosine:drain", "w")]
ALLOWED = {
    "verifier": COMMON + HEARTBEAT + [
        ("XGROUP", "CREATE", "cosine:requests", "verifiers", "0", "MKSTREAM"),
        ("XGROUP", "CREATE", "cosine:verify:v", "verifiers", "0", "MKSTREAM"),
        ("XREADGROUP", "GROUP", "verifiers", "v", "COUNT", "8", "BLOCK", "5", "STREAMS", "cosine:requests",
         "cosine:verify:v", ">", ">"),
        ("XACK", "cosine:requests", "verifiers", "1-1"), ("XDEL", "cosine:requests", "1-1"),
        ("XACK", "cosine:verify:v", "verifiers", "1-1"), ("XDEL", "cosine:verify:v", "1-1"),
        ("XPENDING", "cosine:requests", "verifiers", "-", "+", "10"),
        ("XCLAIM", "cosine:requests", "verifiers", "v", "100", "1-1", "JUSTID"),
        ("XRANGE", "cosine:requests", "1-1", "1-1"), ("XINFO", "CONSUMERS", "cosine:requests", "verifiers"),
        ("XGROUP", "DELCONSUMER", "cosine:requests", "verifiers", "dead"),
        ("XADD", "cosine:draft:d", "MAXLEN", "~", "1000", "*", "f", "v"),
        ("XADD", f"cosine:out:{RID}", "*", "f", "v"), ("PEXPIRE", f"cosine:out:{RID}", "1000"),
        ("XRANGE", f"cosine:out:{RID}", "-", "+"), ("EXISTS", f"cosine:cancelled:{RID}"),
        ("GET", f"cosine:cancelled:{RID}"),  # the marker holds the owner's secret, checked before it counts
        ("XREAD", "COUNT", "10", "STREAMS", "cosine:cancel", "0"),
        ("XREVRANGE", "cosine:cancel", "+", "-", "COUNT", "1"),
        ("XADD", "cosine:dlq", "*", "f", "v"),
        ("SET", "cosine:lock:reclaim", "v", "NX", "PX", "1000"),
        ("DEL", "cosine:draft:dead", "cosine:verify:dead", "cosine:ask:dead", "cosine:votes:dead",
         "cosine:worker:dead"),
        ("HGET", "cosine:control", "version"), ("HGETALL", "cosine:control"),
        ("ZRANGEBYSCORE", "cosine:workers", "0", "+inf"), ("HGETALL", "cosine:worker:w"),
        ("SET", "cosine:inflight:v", "[]", "PX", "1000"),
    ],
    "drafter": COMMON + HEARTBEAT + [
        ("XGROUP", "CREATE", "cosine:draft:d", "drafters", "0", "MKSTREAM"),
        ("XREADGROUP", "GROUP", "drafters", "d", "COUNT", "8", "STREAMS", "cosine:draft:d", ">"),
        ("XACK", "cosine:draft:d", "drafters", "1-1"), ("XDEL", "cosine:draft:d", "1-1"),
        ("XLEN", "cosine:draft:d"), ("XADD", "cosine:verify:v", "*", "f", "v"),
        ("XADD", "cosine:ask:peer", "*", "f", "v"), ("XADD", "cosine:votes:lead", "*", "f", "v"),
        ("XREAD", "STREAMS", "cosine:ask:d", "0"), ("XREVRANGE", "cosine:votes:d", "+", "-", "COUNT", "1"),
        ("XADD", "cosine:dlq", "*", "f", "v"),
        ("HGET", "cosine:control", "version"), ("HGETALL", "cosine:control"),
    ],
    "controller": COMMON + HEARTBEAT + [
        ("XINFO", "GROUPS", "cosine:requests"), ("XPENDING", "cosine:draft:d", "drafters"),
        ("XLEN", "cosine:verify:v"), ("XRANGE", "cosine:requests", "(1-1", "+", "COUNT", "1"),
        ("ZRANGEBYSCORE", "cosine:workers", "0", "+inf"), ("ZSCORE", "cosine:workers", "w"),
        ("HGETALL", "cosine:worker:w"),
        ("WATCH", "cosine:control"), ("UNWATCH",), ("HGET", "cosine:control", "version"),
        ("DEL", "cosine:control"), ("HSET", "cosine:control", "version", "1"),
        ("XADD", "cosine:control:log", "*", "f", "v"),
        ("SET", "cosine:lock:controller", "me", "NX", "PX", "1000"), ("GET", "cosine:lock:controller"),
        ("SCRIPT", "LOAD", "return 1"), ("EVALSHA", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", "1",
                                        "cosine:lock:controller", "me", "1000"),
        ("PEXPIRE", "cosine:lock:controller", "1000"), ("DEL", "cosine:lock:controller"),  # inside the scripts
    ],
    "producer": [
        ("PING",), ("TIME",), ("MULTI",), ("EXEC",), ("XLEN", "cosine:requests"),
        ("ZRANGEBYSCORE", "cosine:workers", "0", "+inf"), ("HGET", "cosine:worker:w", "role"),
        ("XADD", "cosine:requests", "MAXLEN", "~", "10000", "*", "f", "v"),
        ("SET", f"cosine:cancelled:{RID}", "1", "PX", "1000"), ("XADD", "cosine:cancel", "*", "f", "v"),
        ("XREAD", "COUNT", "256", "BLOCK", "10", "STREAMS", f"cosine:out:{RID}", "0-0"),
    ],
    "dashboard": [
        ("PING",), ("TIME",), ("INFO",), ("XINFO", "GROUPS", "cosine:requests"),
        ("XINFO", "STREAM", "cosine:requests"), ("XPENDING", "cosine:requests", "verifiers"),
        ("XRANGE", "cosine:requests", "-", "+"), ("XREVRANGE", "cosine:control:log", "+", "-", "COUNT", "8"),
        ("XREAD", "STREAMS", f"cosine:out:{RID}", "0"), ("XLEN", "cosine:dlq"), ("HGETALL", "cosine:control"),
        ("ZRANGE", "cosine:workers", "0", "-1"), ("ZRANGEBYSCORE", "cosine:workers", "0", "+inf"),
        ("TYPE", "cosine:requests"), ("EXISTS", "cosine:dlq"), ("SCAN", "0", "MATCH", "cosine:*"),
        ("HGETALL", "cosine:drain"), ("GET", "cosine:inflight:v"),
    ],
    "maintenance": [  # cosine/batch/maintenance.py, forget_dead_workers included
        ("PING",), ("TIME",), ("MULTI",), ("EXEC",), ("XREVRANGE", "cosine:dlq", "+", "-", "COUNT", "10000"),
        ("SET", "cosine:lock:maintenance-stale-consumers", "me", "NX", "PX", "10000"),
        ("ZRANGEBYSCORE", "cosine:workers", "0", "+inf"), ("ZRANGE", "cosine:workers", "0", "-1"),
        ("ZSCORE", "cosine:workers", "w"), ("ZREM", "cosine:workers", "w"), ("HGETALL", "cosine:worker:w"),
        ("SCAN", "0", "MATCH", "cosine:draft:*", "COUNT", "1000"),
        ("XINFO", "CONSUMERS", "cosine:requests", "verifiers"), ("XINFO", "CONSUMERS", "cosine:draft:d", "drafters"),
        ("XINFO", "CONSUMERS", "cosine:verify:v", "verifiers"),
        ("XPENDING", "cosine:requests", "verifiers", "IDLE", "1000", "-", "+", "10", "dead"),
        ("XCLAIM", "cosine:requests", "verifiers", "v", "1000", "1-1"),
        ("XACK", "cosine:draft:d", "drafters", "1-1"), ("XDEL", "cosine:draft:d", "1-1"),
        ("XACK", "cosine:verify:v", "verifiers", "1-1"), ("XDEL", "cosine:verify:v", "1-1"),
        ("XGROUP", "DELCONSUMER", "cosine:requests", "verifiers", "dead"),
        ("XGROUP", "DELCONSUMER", "cosine:draft:d", "drafters", "dead"),
        ("DEL", "cosine:draft:dead", "cosine:verify:dead", "cosine:ask:dead", "cosine:votes:dead",
         "cosine:worker:dead"),
    ],
    "celery": [
        ("LPUSH", "cosine-celery:q", "x"), ("BRPOP", "cosine-celery:q", "1"), ("SET", "cosine-celery:r", "x"),
        ("PUBLISH", "cosine-celery:ch", "x"), ("MULTI",), ("EXEC",),
        ("TIME",),  # kombu 5.6+ reads the server clock in its binding scripts (inside EVALSHA)
        ("ZADD", "cosine-celery:_kombu.binding.deadlines", "GT", "1", "celery"),
        ("PSUBSCRIBE", "cosine-celery:celery.pidbox"),  # remote control: a pattern is granted only literally
    ],
}
REFUSED = {
    "producer": [
        ("XADD", "cosine:draft:d", "*", "f", "v"), ("XADD", f"cosine:out:{RID}", "*", "f", "v"),
        ("XADD", "cosine:verify:v", "*", "f", "v"), ("XTRIM", "cosine:requests", "MAXLEN", "0"),
        ("XGROUP", "DESTROY", "cosine:requests", "verifiers"), ("DEL", "cosine:requests"),
        ("XDEL", "cosine:requests", "1-1"), ("XACK", "cosine:requests", "verifiers", "1-1"),
        ("XREAD", "STREAMS", "cosine:requests", "0"), ("XRANGE", "cosine:requests", "-", "+"),
        ("XREADGROUP", "GROUP", "verifiers", "p", "STREAMS", "cosine:requests", ">"),
        ("HSET", "cosine:control", "k_max", "64"), ("SET", "cosine:lock:controller", "me"),
        ("HSET", "cosine:worker:w", "role", "verifier"), ("ZADD", "cosine:workers", "1", "w"),
        ("SCAN", "0"), ("KEYS", "*"), ("FLUSHALL",), ("HSET", "cosine:drain", "w", "why"),
        ("GET", "cosine:inflight:v"),  # other clients' request ids: never the producer's to read
    ],
    "dashboard": [
        ("XADD", "cosine:requests", "*", "f", "v"), ("HSET", "cosine:control", "k", "1"), ("DEL", "cosine:dlq"),
        ("XACK", "cosine:requests", "verifiers", "1-1"), ("XGROUP", "CREATE", "cosine:requests", "g", "0"),
        ("XGROUP", "DESTROY", "cosine:requests", "verifiers"), ("SET", "cosine:x", "1"),
        ("PEXPIRE", "cosine:control", "1"), ("XTRIM", "cosine:requests", "MAXLEN", "0"), ("XDEL", "cosine:dlq", "1-1"),
        ("XREADGROUP", "GROUP", "verifiers", "d", "STREAMS", "cosine:requests", ">"),
        ("EVAL", "return 1", "0"), ("FLUSHALL",), ("CONFIG", "SET", "appendonly", "no"), ("KEYS", "*"),
        ("GET", "other:key"), ("HSET", "cosine:drain", "w", "why"),  # the dashboard's actions need another user
    ],
    "drafter": [
        ("XADD", f"cosine:out:{RID}", "*", "f", "v"), ("XADD", "cosine:requests", "*", "f", "v"),
        ("XACK", "cosine:requests", "verifiers", "1-1"), ("XREAD", "STREAMS", "cosine:verify:v", "0"),
        ("HSET", "cosine:control", "k", "1"), ("SET", f"cosine:cancelled:{RID}", "1"),
        ("XGROUP", "DESTROY", "cosine:draft:d", "drafters"), ("FLUSHALL",),
    ],
    "verifier": [
        ("HSET", "cosine:control", "k", "1"), ("XADD", "cosine:control:log", "*", "f", "v"),
        ("SET", "cosine:lock:controller", "me"), ("SET", f"cosine:cancelled:{RID}", "1"),
        ("XREAD", "STREAMS", "cosine:draft:d", "0"), ("XGROUP", "DESTROY", "cosine:requests", "verifiers"),
        ("XTRIM", "cosine:requests", "MAXLEN", "0"), ("EVAL", "return 1", "0"), ("FLUSHALL",), ("KEYS", "*"),
    ],
    "controller": [
        ("XADD", "cosine:requests", "*", "f", "v"), ("XADD", "cosine:draft:d", "*", "f", "v"),
        ("XADD", f"cosine:out:{RID}", "*", "f", "v"), ("XACK", "cosine:requests", "verifiers", "1-1"),
        ("XGROUP", "DESTROY", "cosine:requests", "verifiers"), ("SET", "cosine:lock:reclaim", "me"),
        ("EVAL", "return 1", "0"), ("FLUSHALL",),
    ],
    "maintenance": [  # it tidies streams: it never writes a message, trims, reads a request's output or deletes
        ("XADD", "cosine:requests", "*", "f", "v"), ("XADD", "cosine:dlq", "*", "f", "v"), ("DEL", "cosine:requests"),
        ("DEL", "cosine:dlq"), ("DEL", "cosine:control"), ("XDEL", "cosine:dlq", "1-1"),
        ("XREAD", "STREAMS", f"cosine:out:{RID}", "0"), ("HSET", "cosine:control", "k", "1"),
        ("HSET", "cosine:worker:w", "role", "verifier"), ("ZADD", "cosine:workers", "1", "w"),
        ("XREADGROUP", "GROUP", "verifiers", "m", "STREAMS", "cosine:requests", ">"),
        ("XGROUP", "DESTROY", "cosine:requests", "verifiers"), ("XTRIM", "cosine:requests", "MAXLEN", "0"),
        ("SET", "cosine:lock:reclaim", "me"), ("EVAL", "return 1", "0"), ("KEYS", "*"), ("FLUSHALL",),
    ],
    "celery": [
        ("GET", "cosine:control"), ("XADD", "cosine:requests", "*", "f", "v"), ("PUBLISH", "cosine:x", "m"),
        ("KEYS", "*"), ("FLUSHALL",), ("FUNCTION", "FLUSH"), ("CONFIG", "SET", "save", ""),
        ("PSUBSCRIBE", "cosine:*"), ("PSUBSCRIBE", "*"),  # no listening in on CoSine's or every channel
    ],
}
# One real command per role that Redis must refuse with NOPERM (not just DRYRUN's word for it).
REAL_REFUSALS = {
    "producer": [("XADD", f"cosine:out:{RID}", "*", "f", "v"), ("XADD", "cosine:draft:d", "*", "f", "v"),
                 ("XTRIM", "cosine:requests", "MAXLEN", "0"), ("XGROUP", "DESTROY", "cosine:requests", "verifiers")],
    "dashboard": [("XADD", "cosine:requests", "*", "f", "v"), ("HSET", "cosine:control", "k", "1"),
                  ("DEL", "cosine:dlq"), ("XACK", "cosine:requests", "verifiers", "1-1"),
                  ("XGROUP", "CREATE", "cosine:requests", "g", "0", "MKSTREAM")],
    "drafter": [("XADD", f"cosine:out:{RID}", "*", "f", "v")],
    "verifier": [("HSET", "cosine:control", "k", "1")],
    "controller": [("XADD", "cosine:requests", "*", "f", "v")],
    "celery": [("GET", "cosine:control")],
    "maintenance": [("DEL", "cosine:requests")],
}


def test_the_config_as_shipped_is_what_runs(broker):
    cfg = login(broker, "admin").config_get("*")
    assert cfg["appendonly"] == "yes" and cfg["appendfsync"] == "everysec"
    assert cfg["maxmemory-policy"] == "noeviction" and cfg["protected-mode"] == "yes" and cfg["save"] == ""
    assert cfg["aclfile"] == str(ACL)
    users = {u.decode() if isinstance(u, bytes) else u for u in login(broker, "admin").acl_users()}
    assert users == {"default"} | {user_for(role) for role in [*ALLOWED, "admin"]}


def test_the_default_user_is_off(broker):
    def client(**auth):
        return redis.Redis(host="127.0.0.1", port=broker, socket_timeout=5, retry=None, **auth)

    with pytest.raises(redis.AuthenticationError):
        client().ping()
    with pytest.raises(redis.AuthenticationError):
        client(username="default", password="").ping()
    with pytest.raises(redis.AuthenticationError):
        client(username=user_for("producer"), password="wrong").ping()


@pytest.mark.parametrize("role", sorted(ALLOWED))
def test_each_role_may_run_what_its_code_runs(broker, role):
    denied = [(cmd, why) for cmd in ALLOWED[role] if (why := dry(broker, role, *cmd)) != "OK"]
    assert not denied, denied


@pytest.mark.parametrize("role", sorted(REFUSED))
def test_each_role_is_refused_what_lies_outside_its_rights(broker, role):
    let_through = [cmd for cmd in REFUSED[role] if not refused(broker, role, *cmd)]
    assert not let_through, let_through


@pytest.mark.parametrize("role", sorted(REAL_REFUSALS))
def test_real_commands_outside_a_role_get_noperm(broker, role):
    admin = login(broker, "admin")
    admin.xgroup_create("cosine:requests", "verifiers", id="0", mkstream=True)
    admin.xadd("cosine:requests", {"f": "v"})
    try:
        r = login(broker, role)
        for cmd in REAL_REFUSALS[role]:
            with pytest.raises(redis.exceptions.NoPermissionError):
                r.execute_command(*cmd)
        assert admin.xlen("cosine:requests") == 1  # nothing was trimmed
        assert not admin.exists(f"cosine:out:{RID}", "cosine:draft:d", "cosine:control")
        assert [g["name"] for g in admin.xinfo_groups("cosine:requests")] == [b"verifiers"]
    finally:
        admin.delete("cosine:requests")


def test_the_dashboard_reads_but_writes_nothing(broker):
    admin, dash = login(broker, "admin"), login(broker, "dashboard")
    admin.xgroup_create("cosine:requests", "verifiers", id="0", mkstream=True)
    admin.hset("cosine:control", mapping={"version": "3"})
    try:
        assert dash.xinfo_groups("cosine:requests")[0]["name"] == b"verifiers"
        assert dash.hgetall("cosine:control") == {b"version": b"3"}
        assert dash.type("cosine:requests") == b"stream" and dash.exists("cosine:control") == 1
        assert sorted(dash.scan_iter("cosine:*")) == [b"cosine:control", b"cosine:requests"]
        assert "redis_version" in dash.info("server")
        with pytest.raises(redis.exceptions.NoPermissionError):
            dash.xgroup_destroy("cosine:requests", "verifiers")
    finally:
        admin.delete("cosine:requests", "cosine:control")


def test_the_controller_lease_scripts_run_under_its_user(broker):
    from cosine.service.controller_service import _RELEASE, _RENEW

    ctl = login(broker, "controller")
    assert ctl.set("cosine:lock:controller", "me", nx=True, px=5000)
    assert ctl.register_script(_RENEW)(keys=["cosine:lock:controller"], args=["me", 5000]) == 1
    assert ctl.register_script(_RELEASE)(keys=["cosine:lock:controller"], args=["me"]) == 1
    with pytest.raises(redis.exceptions.NoPermissionError):  # a script cannot reach past the user's keys
        ctl.register_script("return redis.call('del', KEYS[1])")(keys=["cosine:requests"])


def test_the_units_pass_no_relative_paths_and_each_role_has_its_user():
    conf = {line.split()[0]: line.split(maxsplit=1)[1] for line in CONF.read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    assert conf["aclfile"].startswith("/"), "a relative aclfile breaks once --dir changes the working directory"
    units = ROOT / "deploy" / "systemd"
    exec_start = next(line for line in (units / "cosine-redis.service").read_text().splitlines()
                      if line.startswith("ExecStart="))
    args = shlex.split(exec_start.removeprefix("ExecStart="))
    assert args[1].startswith("/") and args[1].endswith("broker_config/redis.conf")
    assert args[args.index("--dir") + 1].startswith("/")
    for unit, role in [("cosine-verifier@.service", "verifier"), ("cosine-drafter@.service", "drafter"),
                       ("cosine-controller.service", "controller")]:
        text = (units / unit).read_text()
        assert f"COSINE_REDIS_USERNAME={user_for(role)}" in text, unit
        assert user_for(role) in PASSWORDS


def test_passwords_never_show_in_urls_printed():
    assert redact_url("redis://cosine-producer:s3cret@h:6379/0") == "redis://cosine-producer:***@h:6379/0"
    assert redact_url("rediss://:s3cret@h:6380/0?ssl_cert_reqs=none") == "rediss://:***@h:6380/0?ssl_cert_reqs=none"
    assert "s3cret" not in redact_url("unix:///run/redis.sock?password=s3cret&db=1")
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert role_url("h", 1, "producer", "p@ss/word") == "redis://cosine-producer:p%40ss%2Fword@h:1/0"


def test_broker_config_wires_each_worker_to_its_user_without_a_password_on_its_command_line():
    from cosine.deployment import Deployment, WorkerSpec

    dep = Deployment([WorkerSpec("verifier", "v"), WorkerSpec("drafter", "d"), WorkerSpec("controller", "c")])
    use_broker_config(dep, ACL.parent)
    for spec in dep.specs:
        cmd = dep.command(spec)
        assert cmd[cmd.index("--redis-url") + 1] == f"redis://{user_for(spec.role)}@127.0.0.1:{dep.local.port}/0"
        assert not any(password(spec.role) in arg for arg in cmd)
        assert spec.env["COSINE_REDIS_PASSWORD"] == password(spec.role)
    dep.local.close()
    with pytest.raises(BrokerConfigError):  # it starts its own Redis
        use_broker_config(Deployment([], redis_url="redis://127.0.0.1:1/0"), ACL.parent)


def test_another_prefix_gets_the_patterns_moved(tmp_path):
    moved = BrokerConfig(ACL.parent).acl_for_prefix("tenant", tmp_path).read_text()
    assert "~cosine:" not in moved and "%R~tenant:out:*" in moved and "~cosine-celery:*" in moved


# -- a whole deployment: `cosine up --broker-config broker_config/` -----------------------------------------------
@pytest.fixture(scope="module")
def up(tmp_path_factory):
    """`cosine up --broker-config broker_config/` with a verifier, a drafter and the controller; yields the port."""
    logs = tmp_path_factory.mktemp("up")
    cmd = [sys.executable, "-m", "cosine.cli", "up", "--broker-config", str(ACL.parent), "--log-dir", str(logs),
           "--device", "cpu", "--dtype", "float32", "--control-interval-ms", "200"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("COSINE_REDIS_URL", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    lines: list[str] = []
    port = None
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("CoSine is up" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.1)
        port = int(re.search(r"@127\.0\.0\.1:(\d+)/", next(x for x in lines if "CoSine is up" in x)).group(1))
        yield port, lines
    finally:
        proc.send_signal(signal.SIGTERM)  # `cosine up` stops its workers, then its Redis
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # itself and its workers; its Redis runs in a session of its own
            proc.wait()
            if port is not None:
                try:
                    login(port, "admin").shutdown(nosave=True)
                except redis.RedisError:
                    pass


def connected_users(port: int) -> dict[str, set[str]]:
    """The addresses of the connected clients, by ACL user."""
    out: dict[str, set[str]] = {}
    for c in login(port, "admin").client_list():
        out.setdefault(c["user"], set()).add(c["addr"])
    return out


@pytest.mark.slow
def test_cosine_up_runs_every_role_as_its_own_user(up, zoo_engine, zoo_prompts, capsys):
    from cosine.client import Client

    port, lines = up
    assert not any("change-me" in line for line in lines), "a password was printed"
    admin = login(port, "admin")
    users = connected_users(port)
    workers = {user_for(r) for r in ("verifier", "drafter", "controller")}
    assert workers <= set(users), users
    # Nobody else: `cosine up` itself waits for the workers as the read-only dashboard, this test is the admin.
    assert set(users) <= workers | {user_for("dashboard"), user_for("admin")}, users
    prompts = [zoo_prompts[d][0] for d in sorted(zoo_prompts)]
    with Client(role_url("127.0.0.1", port, "producer", password("producer"))) as client:
        results = [client.generate(p, max_new_tokens=24, timeout=120) for p in prompts]
    ids = [zoo_engine.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    from cosine.sampling_params import SamplingParams

    refs = [zoo_engine.generate([i], SamplingParams(max_new_tokens=24), speculative=False)[0].output_ids for i in ids]
    ties, failures = greedy_divergences(zoo_engine.verifier.runner.model, ids, [r.token_ids for r in results], refs)
    with capsys.disabled():
        for i, j, gap in ties:
            print(f"\n[near-tie] request {i}: first difference at {j}, top-2 gap {gap:.2e}")
    assert not failures, failures
    assert sum(r.stats["drafts"] for r in results) > 0  # the drafter, under its own user, drafted
    assert admin.acl_log() == [], admin.acl_log()  # no role was refused anything since Redis started


@pytest.mark.slow
def test_cancel_works_under_the_producer(up, zoo_prompts):
    from cosine.client import Client

    port, _ = up
    with Client(role_url("127.0.0.1", port, "producer", password("producer"))) as client:
        rid = client.submit(zoo_prompts["records"][1], max_new_tokens=400, ignore_eos=True)
        dash = login(port, "dashboard")
        deadline = time.monotonic() + 60
        while dash.xlen(client.output_key(rid)) < 1:
            assert time.monotonic() < deadline, "no output"
            time.sleep(0.05)
        client.cancel(rid)
        with pytest.raises(RequestCancelledError):
            client.result(rid, timeout=30)
    assert login(port, "admin").acl_log() == []


@pytest.mark.slow
def test_status_works_under_the_dashboard_and_hides_passwords(up):
    from cosine.cli import cli

    port, _ = up
    secret = password("dashboard")
    with_password = role_url("127.0.0.1", port, "dashboard", secret)
    result = CliRunner().invoke(cli, ["status", "--redis-url", with_password])
    assert result.exit_code == 0, result.output
    assert "verifier-0" in result.output and "drafter-0" in result.output and "controller" in result.output
    assert secret not in result.output and "cosine-dashboard:***@" in result.output
    # The password may also come from the environment, the URL naming only the user.
    result = CliRunner().invoke(cli, ["status", "--json", "--redis-url", role_url("127.0.0.1", port, "dashboard")],
                                env={"COSINE_REDIS_PASSWORD": secret})
    assert result.exit_code == 0, result.output
    assert secret not in result.output and '"alive": true' in result.output
    assert login(port, "admin").acl_log() == []


@pytest.mark.slow
def test_the_dashboard_cosine_up_starts_reads_as_the_dashboard_user(up):
    import urllib.request

    port, lines = up
    page = re.search(r"dashboard: (http://\S+)", "".join(lines)).group(1)
    deadline = time.monotonic() + 20
    while True:  # the dashboard samples once a second: its first states may predate the workers' heartbeats
        with urllib.request.urlopen(page + "api/state", timeout=10) as reply:
            body = reply.read().decode()
        if "verifier-0" in body and "drafter-0" in body and '"redis_up":true' in body:
            break
        assert time.monotonic() < deadline, body[:2000]
        time.sleep(0.5)
    assert password("dashboard") not in body
    assert login(port, "admin").acl_log() == []
