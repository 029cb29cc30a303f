"""Faults, for real: workers killed with SIGKILL and Redis restarted while requests are in flight."""

from __future__ import annotations

import signal
import threading

import pytest

from cosine.client import Client
from cosine.errors import RequestError
from cosine.local_redis import LocalRedis
from cosine.ownership import output_name
from cosine.protocol import Chunk, decode_entry

from .helpers import assert_greedy_exact
from .pipeline_helpers import committed_tokens, deployment, heartbeat_until, streams, wait_for

pytestmark = pytest.mark.slow


def _work(zoo_prompts, n_per_domain=5, max_new=48):
    return [(zoo_prompts[d][i], max_new) for i in range(n_per_domain) for d in sorted(zoo_prompts)]


def _check_identical(zoo_engine, items, results, capsys):
    ids = [zoo_engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t, _ in items]
    assert_greedy_exact(zoo_engine, ids, [r.token_ids for r in results], capsys, [n for _, n in items])


class _Collector:
    """Streams every request on its own thread, checking chunk continuity as a client sees it."""

    def __init__(self, url: str, ids: list[str], owner: str) -> None:
        self.url, self.owner = url, owner  # the submitting client's secret: its requests are readable with it
        self.results: dict[str, object] = {}
        self.errors: dict[str, Exception] = {}
        self.threads = [threading.Thread(target=self._read, args=(rid,), daemon=True) for rid in ids]
        for t in self.threads:
            t.start()

    def _read(self, rid: str) -> None:
        try:
            with Client(self.url, require_workers=False, owner=self.owner) as c:
                self.results[rid] = c.result(rid, timeout=240)
        except Exception as exc:  # noqa: BLE001 - recorded and asserted on
            self.errors[rid] = exc

    def join(self) -> None:
        for t in self.threads:
            t.join(300)


def _in_progress_on(s, ids: list[str], verifier: str, owner: str) -> int:
    """Unfinished requests a given verifier has already written tokens for (a takeover must resume them)."""
    count = 0
    for rid in ids:
        chunks = [decode_entry(fields, (Chunk,)) for _eid, fields in s.r.xrange(s.keys.out(output_name(rid, owner)))]
        if any(c.finished for c in chunks):
            continue
        count += any(c.verifier == verifier and c.token_ids for c in chunks)
    return count


def test_drafter_killed_mid_run(zoo_engine, zoo_prompts, tmp_path, capsys):
    items = _work(zoo_prompts)
    with LocalRedis() as srv, deployment(srv.url, verifiers=1, drafters=2, log_dir=str(tmp_path)) as dep:
        with Client(srv.url) as c:
            ids = [c.submit(t, max_new_tokens=n) for t, n in items]
        col = _Collector(srv.url, ids, c.owner)
        wait_for(lambda: committed_tokens(srv.url, ids, owner=c.owner) >= 60, 120, what="progress before the kill")
        dep.kill("drafter-0", signal.SIGKILL)
        col.join()
        assert not col.errors, col.errors
        results = [col.results[rid] for rid in ids]
        _check_identical(zoo_engine, items, results, capsys)
        # Requests of the dead drafter move to the other one: some request was drafted by both (placement is
        # sticky, so without the kill none is).
        heartbeat_until(srv.url, "verifier", "verifier-0", lambda w: int(w.get("drafter_moves", 0)) >= 1)
        moved = [r for r in results if {"drafter-0", "drafter-1"} <= set(r.stats["drafter_workers"])]
        assert moved, [r.stats["drafter_workers"] for r in results]


def test_verifier_killed_mid_run(zoo_engine, zoo_prompts, tmp_path, capsys):
    items = _work(zoo_prompts)
    # At most 8 requests per verifier, so both verifiers own some of the 15.
    with LocalRedis() as srv, deployment(srv.url, verifiers=2, drafters=1, log_dir=str(tmp_path),
                                         verifier_args=["--max-active", "8"]) as dep:
        s = streams(srv.url)
        with Client(srv.url) as c:
            ids = [c.submit(t, max_new_tokens=n) for t, n in items]
        col = _Collector(srv.url, ids, c.owner)

        def victim_progress():
            owned = [p for p in s.r.xpending_range(s.keys.requests, "verifiers", "-", "+", 1000)
                     if p["consumer"] == b"verifier-0"]
            return (owned and committed_tokens(srv.url, ids, owner=c.owner) >= 60
                    and _in_progress_on(s, ids, "verifier-0", c.owner) >= 1)

        wait_for(victim_progress, 120, what="verifier-0 to own requests and make progress")
        dep.kill("verifier-0", signal.SIGKILL)
        col.join()
        assert not col.errors, col.errors  # the assembler raises on any gap in the stream
        results = [col.results[rid] for rid in ids]
        _check_identical(zoo_engine, items, results, capsys)
        for rid, r in zip(ids, results):
            assert len(r.token_ids) == r.stats["completion_tokens"]
        heartbeat_until(srv.url, "verifier", "verifier-1",
                        lambda w: int(w.get("reclaimed", 0)) >= 1 and int(w.get("resumed", 0)) >= 1)


def test_redis_killed_and_restarted_mid_run(zoo_engine, zoo_prompts, tmp_path, capsys):
    """Redis SIGKILLed mid-run with AOF everysec (production's setting: up to a second of writes lost), then
    started again: every request ends, either with the target's exact output or with an explicit error."""
    items = _work(zoo_prompts, n_per_domain=3, max_new=64)
    with LocalRedis(appendonly=True, appendfsync="everysec") as srv, \
            deployment(srv.url, verifiers=1, drafters=1, log_dir=str(tmp_path)):
        with Client(srv.url) as c:
            ids = [c.submit(t, max_new_tokens=n, timeout=120) for t, n in items]
        col = _Collector(srv.url, ids, c.owner)
        wait_for(lambda: committed_tokens(srv.url, ids, owner=c.owner) >= 40, 120, what="progress before the kill")
        srv.restart(kill=True)
        col.join()
        assert len(col.results) + len(col.errors) == len(ids), "a request hung"
        for exc in col.errors.values():
            assert isinstance(exc, RequestError), repr(exc)
        done = [(item, col.results[rid]) for item, rid in zip(items, ids) if rid in col.results]
        assert len(done) >= len(ids) // 2, f"{len(col.errors)} of {len(ids)} failed: {col.errors}"
        _check_identical(zoo_engine, [i for i, _ in done], [r for _, r in done], capsys)
        s = streams(srv.url)
        wait_for(lambda: {"verifier-0", "drafter-0"} <= set(s.live_workers()), 20, what="workers after restart")
        with Client(srv.url) as c:
            assert len(c.generate(zoo_prompts["code"][0], max_new_tokens=8).token_ids) >= 1


def test_redis_data_loss_recreates_groups(zoo_engine, zoo_prompts, tmp_path, capsys):
    """FLUSHALL mid-run (a restart without persistence): NOGROUP is recovered from, nothing hangs, and the
    requests the verifier holds go on to the target's exact output."""
    items = _work(zoo_prompts, n_per_domain=2, max_new=64)
    with LocalRedis() as srv, deployment(srv.url, verifiers=1, drafters=1, log_dir=str(tmp_path)):
        with Client(srv.url) as c:
            ids = [c.submit(t, max_new_tokens=n, timeout=60) for t, n in items]
        col = _Collector(srv.url, ids, c.owner)
        wait_for(lambda: committed_tokens(srv.url, ids, owner=c.owner) >= 30, 120, what="progress before the flush")
        streams(srv.url).r.flushall()
        col.join()
        assert len(col.results) + len(col.errors) == len(ids), "a request hung"
        for exc in col.errors.values():
            assert isinstance(exc, RequestError), repr(exc)
        done = [(item, col.results[rid]) for item, rid in zip(items, ids) if rid in col.results]
        assert len(done) >= len(ids) // 2, f"{len(col.errors)} of {len(ids)} failed: {col.errors}"
        _check_identical(zoo_engine, [i for i, _ in done], [r for _, r in done], capsys)
        s = streams(srv.url)
        wait_for(lambda: {"verifier-0", "drafter-0"} <= set(s.live_workers()), 20, what="workers after the flush")
        with Client(srv.url) as c:
            assert len(c.generate(zoo_prompts["prose"][0], max_new_tokens=8).token_ids) >= 1
