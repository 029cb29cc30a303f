"""Watching a deployment without a browser: ``cosine status --watch`` refreshes in the terminal, and
``cosine metrics`` serves Prometheus's text format over HTTP until SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from cosine.cli import cli
from cosine.local_redis import LocalRedis

from .pipeline_helpers import streams, wait_for


def _beat(url: str, worker: str, active: int) -> None:
    streams(url).heartbeat(worker, {"role": "verifier", "active": active, "capacity": 8, "busy": 0.5})


def test_status_watch_refreshes_with_what_changed():
    with LocalRedis() as srv:
        _beat(srv.url, "verifier-a", 3)
        runner = CliRunner()
        out = runner.invoke(cli, ["status", "--redis-url", srv.url, "--watch", "0.1", "--count", "3"])
        assert out.exit_code == 0, out.output
        assert out.output.count("cosine status, every 0.1 s") == 3
        assert out.output.count("verifier-a") >= 3
        streams(srv.url).r.delete(streams(srv.url).keys.workers)  # the worker goes: the next refresh says so
        again = runner.invoke(cli, ["status", "--redis-url", srv.url, "--watch", "0.1", "--count", "1"])
        assert "verifier-a" not in again.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_are_served_over_http_until_sigterm():
    with LocalRedis() as srv:
        _beat(srv.url, "verifier-a", 3)
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-m", "cosine.cli", "metrics", "--redis-url", srv.url,
                                 "--port", str(port)], env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            def scrape():
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                        return resp.read().decode()
                except OSError:
                    return None

            text = wait_for(scrape, 30, 0.2, "the metrics endpoint")
            fams = {f.name: f for f in text_string_to_metric_families(text)}
            assert [s.value for s in fams["cosine_redis_up"].samples] == [1.0]
            active = {s.labels["worker"]: s.value for s in fams["cosine_worker_active_requests"].samples}
            assert active == {"verifier-a": 3.0}
            _beat(srv.url, "verifier-a", 5)  # each scrape reads Redis afresh
            fams = {f.name: f for f in text_string_to_metric_families(scrape())}
            assert [s.value for s in fams["cosine_worker_active_requests"].samples] == [5.0]
        finally:
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 15
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
        assert proc.returncode == 0
