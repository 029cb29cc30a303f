"""The dashboard against a live deployment started by ``cosine up``, in a real browser (Debian's chromium through
Playwright): the panels show what XINFO and ``cosine status`` say, they move without a reload, the console stays
clean; the read-only dashboard runs under the shipped read-only Redis user; admin actions need the token,
drain a real worker process and requeue a dead-lettered request that then completes exactly."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from cosine.broker import RedisSettings, Streams, connect
from cosine.client import Client, build_request
from cosine.keys import VERIFIERS_GROUP, Keys
from cosine.local_redis import LocalRedis, free_port
from cosine.protocol import entry

from .pipeline_helpers import wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("COSINE_TEST_ARTIFACTS", ROOT / "test-artifacts"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
CLI = [sys.executable, "-m", "cosine.cli"]


def shipped_user(name: str) -> list[str]:
    """The ACL rules of ``name`` in broker_config/users.acl, as shipped (its password placeholder included)."""
    for line in (ROOT / "broker_config" / "users.acl").read_text().splitlines():
        if line.startswith(f"user {name} "):
            return shlex.split(line)[2:]
    raise AssertionError(f"no user {name} in broker_config/users.acl")


def http(url: str, body: dict | None = None, token: str | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def start_dashboard(url: str, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([*CLI, "dashboard", "--redis-url", url, "--port", str(port), "--interval", "0.5",
                             *extra], stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def serving():
        assert proc.poll() is None, log.read_text()
        try:
            return http(base + "/api/state")[0] == 200
        except OSError:
            return False

    wait_for(serving, 30, 0.2, what="the dashboard")
    return proc, base


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@pytest.fixture(scope="module")
def redis_server():
    with LocalRedis() as srv:
        yield srv


@pytest.fixture(scope="module")
def up(redis_server, tmp_path_factory):
    """``cosine up`` on the test's Redis, as a user runs it; yields its dashboard URL."""
    logs = tmp_path_factory.mktemp("up")
    proc = subprocess.Popen([*CLI, "up", "--redis-url", redis_server.url, "--control-interval-ms", "200",
                             "--dashboard-port", str(free_port()), "--log-dir", str(logs)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    url = None
    deadline = time.monotonic() + 180
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.match(r"dashboard: (http://\S+)/", line)
        url = m.group(1) if m else None
    assert url, "".join(lines)
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe drained
    yield url
    assert stop(proc) == 0


@pytest.fixture(scope="module")
def readonly_url(redis_server) -> str:
    """A URL for the shipped read-only dashboard user (its rules from users.acl, a password of the test's)."""
    rules = [r for r in shipped_user("cosine-dashboard") if not r.startswith(">")]
    redis.Redis.from_url(redis_server.url).execute_command("ACL", "SETUSER", "cosine-dashboard", *rules, ">ro-pw")
    return redis_server.url.replace("redis://", "redis://cosine-dashboard:ro-pw@")


@pytest.fixture(scope="module")
def readonly_dashboard(up, readonly_url, tmp_path_factory):
    proc, base = start_dashboard(readonly_url, tmp_path_factory.mktemp("dash") / "dashboard.log")
    yield base
    assert stop(proc) == 0  # uvicorn stops cleanly on SIGTERM


@pytest.fixture(scope="module")
def traffic(up, redis_server, zoo_prompts):
    """Requests submitted one after another (two clients) until the module ends."""
    halt = threading.Event()
    texts = [t for d in sorted(zoo_prompts) for t in zoo_prompts[d][:2]]

    def run(offset: int):
        with Client(redis_server.url, name=f"load-{offset}") as c:
            i = offset
            while not halt.is_set():
                try:
                    c.generate(texts[i % len(texts)], max_new_tokens=32, timeout=60)
                except Exception:  # noqa: BLE001 - the browser test freezes the verifier meanwhile
                    pass
                i += 2

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(2)]
    for t in threads:
        t.start()
    yield
    halt.set()
    for t in threads:
        t.join(90)


def test_up_prints_a_dashboard_url_that_serves_the_page_assets_and_metrics(up):
    status, page = http(up + "/")
    assert status == 200 and "<title>CoSine dashboard</title>" in page
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page):
        assert http(up + asset)[0] == 200, asset  # shipped in the package: nothing from a CDN
    assert "http" not in re.sub(r'(?:src|href)="/static/[^"]+"', "", page).replace("http-equiv", "")
    wait_for(lambda: json.loads(http(up + "/api/state")[1])["redis_up"], 10, what="a reading")
    status, text = http(up + "/metrics")
    names = {f.name for f in text_string_to_metric_families(text)}
    assert status == 200 and {"cosine_redis_up", "cosine_stream_depth", "cosine_worker_up"} <= names
    assert http(up + "/health")[0] == 200


def test_the_read_only_user_can_read_and_not_write(readonly_url, readonly_dashboard):
    r = redis.Redis.from_url(readonly_url)
    keys = Keys("cosine")
    assert r.xinfo_groups(keys.requests)  # reads work
    for write in (lambda: r.xadd(keys.requests, {"x": "1"}), lambda: r.hset(keys.drain, "verifier-0", "x"),
                  lambda: r.delete(keys.dlq), lambda: r.xgroup_destroy(keys.requests, VERIFIERS_GROUP)):
        with pytest.raises(redis.exceptions.NoPermissionError):
            write()
    status, body = http(readonly_dashboard + "/api/actions/drain", {"worker": "verifier-0"}, token="x")
    assert status == 403 and "actions are off" in body


def page_cells(page, table: str, key: str) -> dict[str, dict[str, str]]:
    """The rows of a dashboard table by their ``data-{key}``, each as {field: text}."""
    return page.evaluate(
        """([table, key]) => Object.fromEntries([...document.querySelectorAll(`#${table} tbody tr`)].map(tr =>
             [tr.dataset[key] + (tr.dataset.group ? '|' + tr.dataset.group : ''),
              Object.fromEntries([...tr.querySelectorAll('td[data-field]')].map(td =>
                [td.dataset.field, td.textContent]))]))""", [table, key])


def test_the_dashboard_in_a_browser(up, readonly_dashboard, readonly_url, redis_server, traffic):
    from playwright.sync_api import sync_playwright

    r = redis.Redis.from_url(redis_server.url)
    keys = Keys("cosine")
    r.xadd(keys.requests, {"garbage": "not a request"})  # a dead letter, with its reason, to show
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(readonly_dashboard + "/")
            page.evaluate("window.loadedOnce = true")  # survives only if the page is never reloaded

            def seq() -> int:
                return int(page.text_content("#seq"))

            # It moves: new readings arrive, and the traffic's tokens show up, without a reload.
            page.wait_for_function("window.cosineState && window.cosineState.requests.completed >= 2", timeout=90_000)
            first, completed = seq(), page.evaluate("window.cosineState.requests.completed")
            page.wait_for_function(f"window.cosineState.requests.completed > {completed}", timeout=60_000)
            assert seq() > first and page.evaluate("window.loadedOnce") is True
            assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
            page.wait_for_function("window.cosineState.series.length >= 8 && "
                                   "document.querySelectorAll('#chart-depth canvas').length > 0")

            # Frozen (the verifier stopped, holding a long request), the panels equal XINFO and `cosine status`.
            with Client(redis_server.url, name="probe") as probe:
                held = probe.submit("def main():\n", max_new_tokens=400, ignore_eos=True)

                def holding():
                    snap = cosine_status(readonly_url)
                    [v] = [w for w in snap["workers"] if w.get("role") == "verifier"]
                    return v if held in v.get("inflight", "") else None

                verifier = wait_for(holding, 60, 0.2, what="the verifier to list the probe request")
                os.kill(int(verifier["pid"]), signal.SIGSTOP)
                try:
                    time.sleep(1.0)  # drafts in flight land; then nothing moves
                    page.wait_for_function(f"+document.querySelector('#seq').textContent >= {seq() + 2}")
                    streams = page_cells(page, "streams", "stream")
                    workers = page_cells(page, "workers", "worker")
                    inflight = page_cells(page, "inflight", "request")
                    drafts_shown = page.text_content("#spec-summary td[data-field=drafts]")
                    dlq_shown = page.text_content("#kpi-dlq")
                    reasons = page.eval_on_selector_all("#dlq td[data-field=reason]",
                                                        "tds => tds.map(t => t.textContent)")
                    status = cosine_status(readonly_url)
                    xinfo = {f"{s['stream']}|{g['name'].decode()}": g
                             for s in status["streams"] for g in r.xinfo_groups(s["stream"])}
                    dead_letters = [f[b"reason"].decode() for _, f in r.xrevrange(keys.dlq, count=5)]
                finally:
                    os.kill(int(verifier["pid"]), signal.SIGCONT)
                probe.cancel(held)
            assert set(streams) == set(xinfo) and len(xinfo) >= 3  # requests, a draft and a verify stream
            for key, g in xinfo.items():
                shown = streams[key]
                assert shown["pending"] == str(g["pending"]), key
                assert shown["lag"] == ("–" if g["lag"] is None else str(g["lag"])), key
                assert shown["consumers"] == str(g["consumers"]), key
                assert shown["depth"] == str(g["pending"] + (g["lag"] or 0)), key
            assert {w["id"]: w.get("role") for w in status["workers"]} == {k: v["role"] for k, v in workers.items()}
            assert drafts_shown == str(int(verifier_drafts(status)))
            assert dlq_shown == str(r.xlen(keys.dlq)) != "0"
            assert reasons == dead_letters and any("garbage" in t or "type" in t for t in reasons), reasons
            assert inflight[held]["client"] == "probe" and inflight[held]["verifier"] == "verifier-0"
            assert re.fullmatch(r"\d+ / 400", inflight[held]["progress"])
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "dashboard.png"
            page.wait_for_function(f"+document.querySelector('#seq').textContent >= {seq() + 2}")
            page.screenshot(path=str(shot), full_page=True)
            html = page.content()
            assert shot.stat().st_size > 20_000
        finally:
            browser.close()
    assert errors == []
    assert "ro-pw" not in html  # the Redis password is never shown


def cosine_status(url: str) -> dict:
    """``cosine status --json`` as a user runs it."""
    out = subprocess.run([*CLI, "status", "--json", "--redis-url", url], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def verifier_drafts(status: dict) -> float:
    return sum(float(w.get("spec_drafts", 0)) for w in status["workers"] if w.get("role") == "verifier")


def test_admin_actions_need_the_token_drain_a_worker_and_requeue_a_request(up, redis_server, tmp_path):
    token = "s3cret-admin-token"
    (tmp_path / "token").write_text(token + "\n")
    log = tmp_path / "admin-dashboard.log"
    proc, base = start_dashboard(redis_server.url, log, "--admin-token-file", str(tmp_path / "token"))
    settings = RedisSettings(url=redis_server.url)
    streams = Streams(connect(settings), Keys("cosine"))
    extra = subprocess.Popen([*CLI, "worker", "drafter", "--redis-url", redis_server.url, "--name", "drafter-x",
                              "--device", "cpu", "--threads", "1"], stdout=(tmp_path / "x.log").open("w"),
                             stderr=subprocess.STDOUT)
    try:
        assert http(base + "/api/actions/drain", {"worker": "drafter-x"}, token="wrong")[0] == 401
        assert http(base + "/api/actions/drain", {"worker": "drafter-x"})[0] == 401
        assert http(base + "/api/actions/drain", {"worker": "no-such"}, token=token)[0] == 404
        wait_for(lambda: "drafter-x" in streams.live_workers("drafter"), 60, 0.2, what="the extra drafter")
        status, body = http(base + "/api/actions/drain", {"worker": "drafter-x"}, token=token)
        assert status == 200, body
        assert extra.wait(30) == 0  # it drained and exited cleanly
        assert "drafter-x" not in streams.live_workers() and not streams.r.hexists(streams.keys.drain, "drafter-x")

        # A request dead-lettered (as a poison message would be) goes back and completes exactly.
        with Client(redis_server.url) as client:
            prompt = "def parse(line):\n"
            expected = client.generate(prompt, max_new_tokens=16, timeout=120).token_ids
            msg = build_request(prompt, max_new_tokens=16)
            streams.dead_letter(streams.keys.requests, None, b"0-1", entry(msg), "delivered 5 times (test)")
            [dead] = [eid for eid, f in streams.r.xrange(streams.keys.dlq) if f.get(b"reason", b"").startswith(b"deli")]
            assert http(base + "/api/actions/requeue", {"id": dead.decode()}, token="nope")[0] == 401
            status, body = http(base + "/api/actions/requeue", {"id": dead.decode()}, token=token)
            assert status == 200, body
            assert client.result(msg.request_id, timeout=120).token_ids == expected
            assert not streams.r.xrange(streams.keys.dlq, dead, dead)
            assert http(base + "/api/actions/requeue", {"id": dead.decode()}, token=token)[0] == 404
    finally:
        if extra.poll() is None:
            extra.kill()
            extra.wait()
        stop(proc)
    text = log.read_text()
    assert "drain worker drafter-x" in text and f"requeued dead letter {dead.decode()}" in text
    assert "wrong admin token" in text and token not in text
