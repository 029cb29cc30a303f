"""A batch of prompts from a JSONL file, run through the producer client with a bounded number in flight.

Each line is ``{"prompt": ..., "max_new_tokens": ..., <other Client.generate parameters>}`` (an ``"id"`` is
echoed back, not sent). Results are written as JSONL in input order, one per non-blank line, each naming its
``line``; a line that is not a valid request gets ``{"line": n, "error": ..., "error_type": ...}`` in its place,
and the batch goes on. Results go to ``OUT.partial`` first and take the final name when the batch ends, so a
batch run again after its worker died never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cosine.client import Client, GenerationResult
from cosine.errors import CosineError, NoWorkersError, OverloadedError

ECHOED = ("id",)  # fields of a line kept in its result and not sent with the request


def result_row(res: GenerationResult) -> dict:
    """What a generation returns as plain JSON (the ``generate`` task's result, one line of a batch's)."""
    return {"request_id": res.request_id, "text": res.text, "token_ids": list(res.token_ids),
            "finish_reason": res.finish_reason, "stats": res.stats}


def error_row(exc: BaseException) -> dict:
    return {"error": str(exc), "error_type": type(exc).__name__}


def read_lines(path: str | pathlib.Path) -> Iterator[tuple[int, dict | None, dict | None]]:
    """``(line number, request parameters, error row)`` for each non-blank line, one of the last two None."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                job = json.loads(line)
            except ValueError as exc:
                yield n, None, {"error": f"not JSON: {exc}", "error_type": "InvalidLine"}
                continue
            if not isinstance(job, dict) or "prompt" not in job:
                yield n, None, {"error": 'a line must be a JSON object with a "prompt"', "error_type": "InvalidLine"}
                continue
            yield n, job, None


def count_lines(path: str | pathlib.Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


@dataclass
class _Slot:
    line: int
    echo: dict
    request_id: str | None = None
    row: dict | None = None  # already known (an error) when set


def run_batch(client: Client, source: str | pathlib.Path, out: str | pathlib.Path, *, concurrency: int = 8,
              timeout: float = 600.0, progress: Callable[[dict], None] = lambda _: None) -> dict:
    """Run every line of ``source``, at most ``concurrency`` requests in flight, and write the results to
    ``out`` in input order; ``progress`` gets ``{"total", "done", "failed"}`` after each line. ``timeout``: per
    request, in seconds (a deployment that stays full or has no verifier that long fails the line)."""
    out = pathlib.Path(out)
    counts = {"total": count_lines(source), "done": 0, "failed": 0}
    progress(dict(counts))
    window: deque[_Slot] = deque()
    partial = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    with partial.open("w", encoding="utf-8") as sink:

        def finish_oldest() -> None:
            slot = window.popleft()
            row = slot.row
            if row is None:
                try:
                    row = result_row(client.result(slot.request_id, timeout))
                except CosineError as exc:
                    row = {"request_id": slot.request_id, **error_row(exc)}
            sink.write(json.dumps({"line": slot.line, **slot.echo, **row}) + "\n")
            counts["done"] += 1
            counts["failed"] += "error" in row
            progress(dict(counts))

        def submit(params: dict) -> str:
            prompt, deadline = params.pop("prompt"), time.monotonic() + timeout
            while True:
                try:
                    return client.submit(prompt, **{"timeout": timeout, **params})
                except (OverloadedError, NoWorkersError):
                    if any(s.row is None for s in window):
                        finish_oldest()  # make room by waiting for the oldest in flight
                    elif time.monotonic() > deadline:
                        raise
                    else:
                        time.sleep(0.5)

        for line, job, bad in read_lines(source):
            while len(window) >= max(1, concurrency):
                finish_oldest()
            echo = {k: job.pop(k) for k in ECHOED if job is not None and k in job}
            slot = _Slot(line, echo, row=bad)
            if bad is None:
                try:
                    slot.request_id = submit(dict(job))
                except (CosineError, TypeError, ValueError) as exc:
                    slot.row = error_row(exc)
            window.append(slot)
        while window:
            finish_oldest()
    partial.replace(out)
    return {**counts, "out": str(out)}
