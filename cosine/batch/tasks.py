"""CoSine's Celery tasks: request-level and offline work through the producer client, and periodic
maintenance (:mod:`cosine.batch.maintenance`). Every argument and result is plain JSON.

The deployment and the credentials come from the app's configuration (:mod:`cosine.batch.celeryconfig`):
generation as the producer, maintenance as the ``cosine-maintenance`` user on a queue of its own.
"""

from __future__ import annotations

import logging

from cosine.batch import maintenance
from cosine.batch.celery_app import app
from cosine.batch.jobs import result_row, run_batch
from cosine.broker import RedisSettings, Streams, connect
from cosine.client import Client
from cosine.keys import Keys

log = logging.getLogger(__name__)


def producer_settings() -> RedisSettings:
    c = app.conf
    return RedisSettings(url=c.cosine_redis_url, prefix=c.cosine_prefix, username=c.cosine_redis_username,
                         password=c.cosine_redis_password)


def maintenance_streams() -> Streams:
    c = app.conf
    settings = RedisSettings(url=c.cosine_maintenance_redis_url, prefix=c.cosine_prefix,
                             username=c.cosine_maintenance_redis_username,
                             password=c.cosine_maintenance_redis_password)
    return Streams(connect(settings), Keys(settings.prefix))


@app.task(name="cosine.generate")
def generate(prompt, timeout: float = 600.0, **params) -> dict:
    """One generation, as ``Client.generate(prompt, timeout=..., **params)``: text, token ids, finish reason
    and stats."""
    with Client(settings=producer_settings()) as client:
        return result_row(client.generate(prompt, timeout=timeout, **params))


@app.task(name="cosine.batch", bind=True)
def batch(self, source: str, out: str, concurrency: int = 8, timeout: float = 600.0) -> dict:
    """Every line of the JSONL file ``source`` through the client, results to ``out`` in order; progress
    (``total``/``done``/``failed``) in the task's state ``PROGRESS``, as Flower and ``cosine batch status`` show."""
    def progress(counts: dict) -> None:
        self.update_state(state="PROGRESS", meta={**counts, "out": out})

    with Client(settings=producer_settings()) as client:
        summary = run_batch(client, source, out, concurrency=concurrency, timeout=timeout, progress=progress)
    log.info("batch %s: %d lines, %d failed, results in %s", source, summary["total"], summary["failed"], out)
    return summary


def _maintain(sweep, **kwargs) -> dict:
    streams = maintenance_streams()
    try:
        return sweep(streams, **kwargs)
    finally:
        streams.r.close()


@app.task(name="cosine.maintenance.dead_letter_report")
def dead_letter_report() -> dict:
    """Dead letters counted by reason (logged and returned)."""
    return _maintain(maintenance.dead_letter_report)


@app.task(name="cosine.maintenance.stale_consumers")
def stale_consumers(idle_s: float | None = None) -> dict:
    """Claim then delete group consumers idle past ``idle_s`` whose worker has no live heartbeat."""
    return _maintain(maintenance.stale_consumers, **({} if idle_s is None else {"idle_s": idle_s}))


@app.task(name="cosine.maintenance.orphan_streams")
def orphan_streams() -> dict:
    """Delete the per-worker streams of workers with no registration."""
    return _maintain(maintenance.orphan_streams)
