"""Celery off the hot path, for real: a Celery worker process (solo pool) against a test Redis and a live
deployment (one verifier, one drafter).

The worker's broker and result connections log in as the shipped ``cosine-celery`` user, its generation tasks as
``cosine-producer`` and its maintenance tasks as ``cosine-maintenance`` (rules from broker_config/users.acl, test
passwords); Redis must refuse none of them anything. Checked: the ``generate`` task returns what
``Client.generate`` does; ``cosine batch submit`` / ``status`` on a JSONL file with bad lines; the maintenance
tasks on real dead letters, stale consumers and orphaned streams.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from cosine.broker import RedisSettings, Streams, connect, xadd_args
from cosine.client import Client, build_request, on_broker_clock
from cosine.keys import DRAFTERS_GROUP, VERIFIERS_GROUP, Keys
from cosine.local_redis import LocalRedis

from .pipeline_helpers import deployment, wait_for

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "cosine.cli"]
USERS = {"cosine-celery": "celery-pw", "cosine-producer": "producer-pw", "cosine-maintenance": "maintenance-pw"}
KEYS = Keys("cosine")


def shipped_user(name: str) -> list[str]:
    """The ACL rules of ``name`` in broker_config/users.acl, as shipped, less its password placeholder."""
    for line in (ROOT / "broker_config" / "users.acl").read_text().splitlines():
        if line.startswith(f"user {name} "):
            return [r for r in shlex.split(line)[2:] if not r.startswith(">")]
    raise AssertionError(f"no user {name} in broker_config/users.acl")


@pytest.fixture(scope="module")
def redis_server():
    with LocalRedis() as srv:
        admin = redis.Redis.from_url(srv.url)
        for user, password in USERS.items():
            admin.execute_command("ACL", "SETUSER", user, *shipped_user(user), f">{password}")
        yield srv


def url_as(srv: LocalRedis, user: str) -> str:
    return srv.url.replace("redis://", f"redis://{user}:{USERS[user]}@")


@pytest.fixture(scope="module")
def cluster(redis_server, tmp_path_factory, zoo_root):
    # The verifier's own reclaim sweep waits a minute here, so the maintenance task is what claims a dead
    # consumer's request (however slow the machine), not a race between the two.
    with deployment(redis_server.url, verifiers=1, drafters=1, verifier_args=["--reclaim-min-idle-s", "60"],
                    log_dir=str(tmp_path_factory.mktemp("batch-logs"))) as dep:
        yield dep


@pytest.fixture(scope="module")
def env(redis_server) -> dict:
    """What the Celery worker and `cosine batch` read: Celery's Redis, the deployment, the maintenance user."""
    out = {**os.environ, "PYTHONUNBUFFERED": "1", "COSINE_PREFIX": "cosine",
           "COSINE_CELERY_BROKER_URL": url_as(redis_server, "cosine-celery"),
           "COSINE_REDIS_URL": url_as(redis_server, "cosine-producer"),
           "COSINE_MAINTENANCE_REDIS_URL": url_as(redis_server, "cosine-maintenance")}
    for name in ("COSINE_CELERY_RESULT_BACKEND", "COSINE_CELERY_CONFIG", "COSINE_REDIS_USERNAME",
                 "COSINE_REDIS_PASSWORD"):
        out.pop(name, None)
    return out


@pytest.fixture(scope="module")
def worker(cluster, env, tmp_path_factory):
    """``celery worker`` on both queues, one task at a time; yields (an app to send tasks with, its log)."""
    from cosine.batch.celery_app import create_app

    log = tmp_path_factory.mktemp("celery") / "worker.log"
    cmd = [sys.executable, "-m", "celery", "-A", "cosine.batch.celery_app", "worker", "--pool", "solo",
           "--concurrency", "1", "-Q", "cosine-batch,cosine-maintenance", "--without-gossip", "--without-mingle",
           "--loglevel", "INFO", "-n", "batch-test@%h"]
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = env["COSINE_CELERY_BROKER_URL"]
    app = create_app(broker_url=url, result_backend=url)
    try:
        wait_for(lambda: proc.poll() is not None or "ready." in log.read_text(), timeout=60, interval=0.1,
                 what="the celery worker")
        assert proc.poll() is None, log.read_text()[-3000:]
        yield app, log
    finally:
        proc.send_signal(signal.SIGTERM)  # warm shutdown
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        app.close()


@pytest.fixture(scope="module")
def producer(redis_server, cluster):
    with Client(url_as(redis_server, "cosine-producer")) as c:
        yield c


@pytest.fixture(scope="module")
def admin(redis_server) -> Streams:
    return Streams(connect(RedisSettings(url=redis_server.url)), KEYS)


def cli(env: dict, *args: str) -> str:
    done = subprocess.run([*CLI, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


@pytest.mark.slow
def test_the_generate_task_returns_what_the_client_does(worker, producer, zoo_prompts):
    app, _ = worker
    prompt = zoo_prompts[sorted(zoo_prompts)[0]][0]
    direct = producer.generate(prompt, max_new_tokens=24, timeout=120)
    via = app.send_task("cosine.generate", args=[prompt], kwargs={"max_new_tokens": 24, "timeout": 120}).get(120)
    assert (via["text"], via["token_ids"], via["finish_reason"]) == (direct.text, direct.token_ids,
                                                                      direct.finish_reason)
    assert via["request_id"] != direct.request_id and set(via["stats"]) == set(direct.stats)


@pytest.mark.slow
def test_batch_submit_and_status(worker, env, tmp_path, zoo_prompts):
    app, _ = worker
    prompts = [zoo_prompts[d][0] for d in sorted(zoo_prompts)][:3]
    lines = [json.dumps({"id": f"p{i}", "prompt": p, "max_new_tokens": 32, "ignore_eos": True})
             for i, p in enumerate(prompts)]
    lines.insert(1, '{"prompt": "unterminated')  # not JSON
    lines.insert(3, json.dumps({"prompt": "x", "max_new_tokens": 8, "temprature": 0.5}))  # not a parameter
    source, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    source.write_text("\n".join(lines) + "\n\n")  # a trailing blank line is no request
    task_id = cli(env, "batch", "submit", str(source), "--out", str(out), "--concurrency", "2")
    from celery.result import AsyncResult

    seen = set()
    res = AsyncResult(task_id, app=app)
    deadline = time.monotonic() + 120
    while not res.ready():  # watched closely from here; `cosine batch status` while it runs and at the end
        seen.add(res.state)
        if res.state == "PROGRESS" and "cli" not in seen:
            seen.add("cli")
            running = json.loads(cli(env, "batch", "status", task_id, "--json"))
            assert running["state"] in ("PROGRESS", "SUCCESS") and running["total"] == 5, running
        assert time.monotonic() < deadline, "the batch did not end"
        time.sleep(0.02)
    assert "PROGRESS" in seen and "cli" in seen, seen
    assert cli(env, "batch", "status", task_id) == f"{task_id} SUCCESS 5/5 done, 2 failed; results: {out}"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5]  # input order
    assert not (tmp_path / "results.jsonl.partial").exists()
    good = [rows[0], rows[2], rows[4]]
    assert [r["id"] for r in good] == ["p0", "p1", "p2"]
    for r in good:
        assert "error" not in r and r["finish_reason"] == "length" and len(r["token_ids"]) == 32 and r["text"]
    assert rows[1]["error_type"] == "InvalidLine" and "not JSON" in rows[1]["error"]
    assert rows[3]["error_type"] == "InvalidParameterError" and "temprature" in rows[3]["error"]


@pytest.mark.slow
def test_dead_letter_report(worker, admin):
    app, log = worker
    admin.r.xadd(KEYS.requests, {"junk": "1"})  # not a request: the verifier dead-letters it
    admin.r.xadd(KEYS.draft("drafter-0"), {"junk": "2"})  # not a draft job: the drafter does
    wait_for(lambda: admin.r.xlen(KEYS.dlq) >= 2, timeout=30, what="two dead letters")
    report = app.send_task("cosine.maintenance.dead_letter_report").get(30)
    letters = admin.r.xrange(KEYS.dlq)
    assert report["total"] == len(letters) >= 2
    reasons: dict[str, int] = {}
    for _, f in letters:
        reasons[f[b"reason"].decode()] = reasons.get(f[b"reason"].decode(), 0) + 1
    assert report["by_reason"] == reasons
    assert report["by_stream"].get("requests", 0) >= 1 and report["by_stream"].get("draft", 0) >= 1
    wait_for(lambda: "dead letters: " in log.read_text(), timeout=10, what="the report in the worker's log")


@pytest.mark.slow
def test_stale_consumers_are_claimed_then_deleted(worker, admin, producer, zoo_prompts):
    app, _ = worker
    prompt = zoo_prompts[sorted(zoo_prompts)[-1]][0]
    msg = build_request(prompt, max_new_tokens=16, client="test", timeout=120)
    # A verifier that read a real request and died before registering: the read and the write in one MULTI,
    # so the live verifier (blocked on the stream) cannot take the entry first.
    pipe = admin.transaction()
    pipe.xadd(**xadd_args(KEYS, KEYS.requests, on_broker_clock(msg)))
    pipe.xreadgroup(VERIFIERS_GROUP, "ghost-verifier", {KEYS.requests: ">"}, count=1)
    pipe.execute()
    admin.r.xgroup_createconsumer(KEYS.requests, VERIFIERS_GROUP, "ghost-idle")
    admin.r.xgroup_createconsumer(KEYS.draft("drafter-0"), DRAFTERS_GROUP, "ghost-drafter")
    time.sleep(0.3)
    report = app.send_task("cosine.maintenance.stale_consumers", kwargs={"idle_s": 0.2}).get(30)
    assert sorted(report["deleted"]) == [f"{KEYS.draft('drafter-0')}/ghost-drafter", f"{KEYS.requests}/ghost-idle",
                                         f"{KEYS.requests}/ghost-verifier"], report
    assert report["claimed"] == 1 and report["claimed_for"] == "verifier-0" and report["kept"] == []
    names = {c["name"].decode() for c in admin.r.xinfo_consumers(KEYS.requests, VERIFIERS_GROUP)}
    assert "verifier-0" in names and not names & {"ghost-verifier", "ghost-idle"}
    # The claimed request runs on the live verifier to the same tokens as a fresh one.
    got = producer.result(msg.request_id, timeout=120)
    assert got.token_ids == producer.generate(prompt, max_new_tokens=16, timeout=120).token_ids


@pytest.mark.slow
def test_orphaned_per_worker_streams_are_removed(worker, admin):
    app, _ = worker
    orphans = [KEYS.draft("gone-1"), KEYS.ask("gone-1"), KEYS.votes("gone-1"), KEYS.verify("gone-2")]
    for key in orphans:
        admin.r.xadd(key, {"f": "v"})
    report = app.send_task("cosine.maintenance.orphan_streams").get(30)
    assert report["removed"] == sorted(orphans)
    assert not admin.r.exists(*orphans)
    assert admin.r.exists(KEYS.draft("drafter-0"), KEYS.verify("verifier-0")) == 2  # live workers keep theirs


@pytest.mark.slow
def test_remote_control_reaches_the_worker(worker):
    """`celery inspect` / revoke / Flower: broadcast over the pidbox channel the celery user may PSUBSCRIBE to."""
    app, _ = worker
    name = f"batch-test@{socket.gethostname()}"
    assert app.control.ping(destination=[name], timeout=10) == [{name: {"ok": "pong"}}]


@pytest.mark.slow
def test_every_user_kept_to_its_rights(worker, admin):
    """Last: nothing above was refused, and Celery's keys all lie under cosine-celery:."""
    assert admin.r.acl_log() == [], admin.r.acl_log()
    celery_keys = [k.decode() for k in admin.r.scan_iter(count=1000) if not k.startswith(b"cosine:")]
    assert celery_keys and all(k.startswith("cosine-celery:") for k in celery_keys), celery_keys


def test_the_configuration_as_documented():
    """json only, late acks, one prefetched, a visibility timeout past a long batch, every key under
    cosine-celery:, and each beat entry a registered task routed to the maintenance queue."""
    from cosine.batch import tasks  # noqa: F401  (registers the tasks)
    from cosine.batch.celery_app import app

    c = app.conf
    assert (c.task_serializer, c.result_serializer, c.accept_content, c.result_accept_content) == (
        "json", "json", ["json"], ["json"])
    assert c.task_acks_late is True and c.worker_prefetch_multiplier == 1
    assert c.broker_transport_options["visibility_timeout"] >= 6 * 3600
    assert c.broker_transport_options["global_keyprefix"] == "cosine-celery:"
    assert c.result_backend_transport_options["global_keyprefix"] == "cosine-celery:"
    for entry in c.beat_schedule.values():
        assert entry["task"] in app.tasks
        assert app.amqp.router.route({}, entry["task"])["queue"].name == "cosine-maintenance"
    assert app.amqp.router.route({}, "cosine.batch")["queue"].name == "cosine-batch"


@pytest.mark.slow
def test_beat_sends_the_maintenance_tasks_on_schedule(worker, env, tmp_path):
    """``celery beat`` as shipped, with the schedule shortened to a second: the worker runs what it sends."""
    _, log = worker
    (tmp_path / "fastbeat.py").write_text(
        "from datetime import timedelta\n"
        "from cosine.batch.celeryconfig import *  # noqa: F403\n"
        "from cosine.batch.celeryconfig import beat_schedule as shipped\n"
        "beat_schedule = {name: {**entry, 'schedule': timedelta(seconds=1)} for name, entry in shipped.items()}\n")
    beat_env = {**env, "COSINE_CELERY_CONFIG": "fastbeat",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))}
    before = log.read_text().count("dead letters: ")
    beat_log = tmp_path / "beat.log"
    with beat_log.open("w") as sink:
        beat = subprocess.Popen([sys.executable, "-m", "celery", "-A", "cosine.batch.celery_app", "beat",
                                 "--schedule", str(tmp_path / "beat-schedule"), "--loglevel", "INFO"],
                                cwd=ROOT, env=beat_env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: log.read_text().count("dead letters: ") >= before + 2, timeout=60, interval=0.2,
                 what="two scheduled dead-letter reports run by the worker")
        text = beat_log.read_text()
        for task in ("dead_letter_report", "stale_consumers", "orphan_streams"):
            assert "Sending due task" in text and task in text, text[-2000:]
    finally:
        beat.send_signal(signal.SIGTERM)
        try:
            beat.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(beat.pid, signal.SIGKILL)
            beat.wait()
