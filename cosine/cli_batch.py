"""``cosine batch``: queue a JSONL file of prompts as a Celery batch task and follow it (docs/batch.md).

Celery's broker comes from ``COSINE_CELERY_BROKER_URL`` (see :mod:`cosine.batch.celeryconfig`). The worker
reads the input file and writes the results file itself, so both paths must be on a filesystem it shares
with this command; they are sent as absolute paths.
"""

from __future__ import annotations

import json
import pathlib
import time

import click


def _app():
    from cosine.batch.celery_app import app

    return app


def describe(task_id: str) -> dict:
    """A batch task's state and progress as plain data (``state``, ``total``/``done``/``failed``, ``out``,
    ``error``)."""
    from celery.result import AsyncResult

    res = AsyncResult(task_id, app=_app())
    state, info = res.state, res.info
    out: dict = {"id": task_id, "state": state}
    if isinstance(info, dict):
        out.update({k: info[k] for k in ("total", "done", "failed", "out") if k in info})
    elif isinstance(info, BaseException):
        out["error"] = f"{type(info).__name__}: {info}"
    return out


def _line(d: dict) -> str:
    text = f"{d['id']} {d['state']}"
    if "total" in d:
        text += f" {d.get('done', 0)}/{d['total']} done, {d.get('failed', 0)} failed"
    if d["state"] == "SUCCESS" and "out" in d:
        text += f"; results: {d['out']}"
    if "error" in d:
        text += f": {d['error']}"
    return text


@click.group()
def batch() -> None:
    """Batch jobs over JSONL files of prompts, run by a Celery worker (celery -A cosine.batch.celery_app worker)."""


@batch.command("submit")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=pathlib.Path), default=None,
              help="Results JSONL, in input order [default: FILE with .results.jsonl].")
@click.option("--concurrency", type=click.IntRange(1, 1024), default=8, show_default=True,
              help="Requests in flight at once.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Per request, in seconds.")
@click.option("--wait", is_flag=True, help="Follow the batch until it ends, printing its progress.")
def submit(file: pathlib.Path, out: pathlib.Path | None, concurrency: int, timeout: float, wait: bool) -> None:
    """Queue FILE (one JSON object a line: {"prompt": ..., "max_new_tokens": ..., ...}); prints the task id."""
    out = out or file.with_name(file.stem + ".results.jsonl")
    res = _app().send_task("cosine.batch", kwargs={"source": str(file.resolve()), "out": str(out.resolve()),
                                                   "concurrency": concurrency, "timeout": timeout})
    click.echo(res.id)
    if wait:
        last = None
        while True:
            d = describe(res.id)
            if _line(d) != last:
                click.echo(last := _line(d))
            if d["state"] in ("SUCCESS", "FAILURE", "REVOKED"):
                break
            time.sleep(1.0)
        if d["state"] != "SUCCESS":
            raise SystemExit(1)


@batch.command("status")
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a line of text.")
def status(task_id: str, as_json: bool) -> None:
    """State and progress of batch TASK_ID (PENDING also means an unknown id), and its results file once done."""
    d = describe(task_id)
    click.echo(json.dumps(d) if as_json else _line(d))
    if d["state"] == "FAILURE":
        raise SystemExit(1)
