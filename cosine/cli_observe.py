"""The commands that watch a deployment: ``status`` (terminal), ``dashboard`` (browser), ``metrics``
(Prometheus) and ``serve`` (the OpenAI-compatible API)."""

from __future__ import annotations

import json
import logging
import socket
import sys
import time

import click

from cosine import defaults
from cosine.cli_options import read_secret, redis_options

log = logging.getLogger("cosine")

SHUTDOWN_GRACE_S = 2  # seconds a server waits for open streams to end once told to stop


@click.command()
@redis_options
@click.option("--json", "as_json", is_flag=True)
@click.option("--timeline", type=int, default=0, show_default=True,
              help="Also show the controller's last N decisions, oldest first, with what it saw.")
@click.option("--watch", "watch_s", type=click.FloatRange(min=0.1), default=None, metavar="SECONDS",
              help="Refresh every SECONDS in the terminal until Ctrl-C (for nodes without a browser).")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="With --watch: stop after this many refreshes  [default: until Ctrl-C].")
def status(broker, as_json, timeline, watch_s, count) -> None:
    """Workers with heartbeat ages, every stream's depth (lag + pending) and the controller's decision."""
    import redis

    from cosine.status import collect_status, format_status, format_timeline

    def show() -> str:
        snap = collect_status(broker, timeline)
        return json.dumps(snap, indent=1) if as_json else format_status(snap) + format_timeline(snap)

    if watch_s is None:
        click.echo(show())
        return
    from cosine.service.run_loop import stop_on_signals

    stop, shown = stop_on_signals(), 0
    while not stop.is_set():
        try:
            text = show()
        except redis.RedisError as exc:  # a broker restart: say so and keep watching
            text = f"Redis unreachable: {exc}"
        if sys.stdout.isatty():
            click.clear()
        click.echo(f"cosine status, every {watch_s:g} s, {time.strftime('%H:%M:%S')} (Ctrl-C stops)\n{text}")
        shown += 1
        if count is not None and shown >= count:
            break
        stop.wait(watch_s)


@click.command()
@redis_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--model-name", default="cosine", show_default=True, help="The model id /v1/models reports.")
def serve(broker, host, port, model_name) -> None:
    """An OpenAI-compatible API over the deployment: /v1/completions, /v1/chat/completions (streaming over
    server-sent events), /v1/models, /health. Unsupported parameters are refused in OpenAI's error shape;
    responses carry the request's speculation stats under "cosine"; a client that disconnects cancels."""
    import uvicorn

    from cosine.openai_server import create_app

    app = create_app(broker, model_name)
    # Streams still open at shutdown (an SSE client) get SHUTDOWN_GRACE_S to finish, then are cancelled
    # (cancelling their requests), so SIGTERM never waits on a client.
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_GRACE_S)


@click.command()
@redis_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(1, 65535), default=9400, show_default=True)
def metrics(broker, host, port) -> None:
    """Serve the deployment's Prometheus metrics on http://HOST:PORT/metrics until Ctrl-C / SIGTERM: speculation
    counters with vLLM's names, queue depths per stream and group, worker gauges (docs/metrics.md). Each
    scrape reads Redis; nothing is kept in this process."""
    from prometheus_client import start_http_server

    from cosine.metrics_export import build_registry
    from cosine.service.run_loop import stop_on_signals

    stop = stop_on_signals()
    server, thread = start_http_server(port, host, build_registry(broker))
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    stop.wait()
    server.shutdown()
    thread.join(timeout=5)


@click.command()
@redis_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(0, 65535), default=defaults.DASHBOARD_PORT, show_default=True,
              help="0: any free port.")
@click.option("--interval", type=click.FloatRange(min=0.2), default=1.0, show_default=True,
              help="Seconds between two readings of the deployment (each reading is pushed to open pages).")
@click.option("--admin-token-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Enable the actions (drain a worker, requeue a dead letter) for whoever sends this token "
                   "[default: $COSINE_DASHBOARD_TOKEN; without one the dashboard is read-only].")
@click.option("--admin-redis-url", default=None,
              help="Redis URL (a user that may write) for the actions [default: --redis-url].")
def dashboard(broker, host, port, interval, admin_token_file, admin_redis_url) -> None:
    """The queue dashboard in a browser: streams and groups (waiting, pending, oldest ages, rates, dead letters),
    workers, speculation (per position, drafter, domain), request throughput and latency, the controller's
    decisions under the queue-depth chart; live over server-sent events; /metrics for Prometheus. Read-only
    (a read-only Redis user suffices) unless an admin token is given."""
    import dataclasses

    import uvicorn

    from cosine.dashboard.app import create_app
    from cosine.service.run_loop import stop_on_signals

    token = read_secret(admin_token_file, "COSINE_DASHBOARD_TOKEN")
    admin = dataclasses.replace(broker, url=admin_redis_url) if admin_redis_url else None
    server = uvicorn.Server(uvicorn.Config(None, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
    server.config.app = create_app(broker, interval=interval, admin_token=token, admin_settings=admin,
                                   stopping=lambda: server.should_exit)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))  # bound here so the URL printed has the port (port 0: any free one)
    click.echo(f"dashboard on http://{host}:{sock.getsockname()[1]}/ (actions {'on' if token else 'off'})", err=True)
    # uvicorn shuts down gracefully on SIGTERM / Ctrl-C, then re-raises the signal to the handler it found:
    # this one only notes it, so a clean stop exits 0.
    stop_on_signals()
    server.run(sockets=[sock])
