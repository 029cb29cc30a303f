"""The verifier's admission under a KV budget, in milliseconds: fakeredis and the simulated target (as in
test_service_unit.py, whose helpers it shares). A request that could never fit is refused with a typed
error; one that does not fit yet waits, still pending for this verifier, and is admitted in order as
requests end."""

from __future__ import annotations

import time

import fakeredis
import pytest

from cosine.broker import RedisSettings, now_ms
from cosine.client import raise_for_chunk
from cosine.errors import InvalidParameterError, InvalidRequestError
from cosine.keys import VERIFIERS_GROUP
from cosine.protocol import Cancel, Chunk
from cosine.service.verifier_service import VerifierService, VerifierSettings
from cosine.sim.engines import SimModel, SimTarget, SimTokenizer
from cosine.status import format_memory

from .test_service_unit import PROMPT, chunks, submit


@pytest.fixture
def connector():
    server = fakeredis.FakeServer()
    return lambda _settings: fakeredis.FakeRedis(server=server)


def make_verifier(connector, capacity: int, **overrides) -> VerifierService:
    engine = SimTarget(SimModel(), time_scale=0)
    engine.capacity_tokens = capacity
    svc = VerifierService(RedisSettings(prefix="t"), VerifierSettings("v0", **overrides), engine, SimTokenizer(),
                          connector=connector)
    svc.recover_own()
    return svc


def tokens(svc: VerifierService, rid: str) -> list[int]:
    return [t for c in chunks(svc, rid) for t in c.token_ids]


def finished(svc: VerifierService, rid: str) -> Chunk | None:
    last = chunks(svc, rid)[-1:] or [None]
    return last[0] if last[0] is not None and last[0].finished else None


def test_a_request_that_could_never_fit_is_refused_with_the_budget_and_its_need(connector):
    svc = make_verifier(connector, capacity=40)
    big = submit(svc, max_new_tokens=100)  # 4 + 100 slots
    svc.step()
    chunk = finished(svc, big.request_id)
    assert chunk is not None and chunk.error_type == "invalid_request"
    with pytest.raises(InvalidRequestError) as err:
        raise_for_chunk(chunk)
    assert err.value.field == "max_new_tokens" and "need 104" in str(err.value) and "holds 40" in str(err.value)
    assert not svc.active and not svc.book.waiting
    assert svc.streams.r.xpending(svc.keys.requests, VERIFIERS_GROUP)["pending"] == 0


def test_requests_beyond_the_budget_wait_in_order_and_all_complete(connector):
    svc = make_verifier(connector, capacity=2 * 16, admit_per_tick=8)  # two requests of 4 + 12 slots at once
    msgs = [submit(svc, max_new_tokens=12) for _ in range(5)]
    svc.step()
    assert len(svc.active) == 2 and [w.rid for w in svc.book.waiting] == [m.request_id for m in msgs[2:]]
    assert svc.info()["waiting"] == 3 and svc.info()["kv_capacity_tokens"] == 32
    assert svc.streams.r.xpending(svc.keys.requests, VERIFIERS_GROUP)["pending"] == 5, "waiting ones stay pending"
    order = []
    for _ in range(200):
        svc.step()
        assert len(svc.engine.seqs) <= 2
        order += [m.request_id for m in msgs if m.request_id not in order and finished(svc, m.request_id)]
        if len(order) == len(msgs):
            break
    truth = SimModel().continuation(PROMPT, 12)
    assert all(tokens(svc, m.request_id) == truth for m in msgs)
    assert set(order[:2]) == {m.request_id for m in msgs[:2]} and order[2:] == [m.request_id for m in msgs[2:]]
    assert svc.metrics.counters["kv_waits"] >= 3 and not svc.book.waiting


def test_a_waiting_request_cancelled_or_past_its_deadline_ends_at_once(connector):
    svc = make_verifier(connector, capacity=60, admit_per_tick=8)
    running = submit(svc, max_new_tokens=50)
    cancelled = submit(svc, max_new_tokens=20)
    late = submit(svc, max_new_tokens=20, timeout=0.5)
    svc.step()
    assert list(svc.active) == [running.request_id] and len(svc.book.waiting) == 2
    svc.streams.r.set(svc.keys.cancelled(cancelled.request_id), b"1")  # what a client's cancel writes
    svc.streams.add(svc.keys.cancel, Cancel(cancelled.request_id))
    time.sleep(max(0.0, (late.deadline_ms - now_ms() + 20) / 1000))
    svc.upkeep._cancels_at = 0.0  # the cancel stream is looked at now
    svc.step()
    assert finished(svc, cancelled.request_id).finish_reason == "cancelled"
    assert finished(svc, late.request_id).finish_reason == "timeout"
    assert not svc.book.waiting and list(svc.active) == [running.request_id]


def test_the_budget_setting_and_the_memory_columns():
    with pytest.raises(InvalidParameterError):
        VerifierSettings("v0", kv_memory=0)
    assert format_memory({"kv_bytes": "1536", "kv_peak_bytes": str(3 * 2**20), "kv_capacity_tokens": "4096",
                          "rss_peak_bytes": str(2**30)}) == ["1.50 KiB", "3.00 MiB", "4096 slots", "1.00 GiB", ""]
    assert format_memory({"kv_capacity_tokens": ""})[2] == "none" and format_memory({})[2] == ""


def test_the_worker_option_takes_sizes_in_units(monkeypatch):
    from click.testing import CliRunner

    from cosine.cli import cli
    from workers import verifier as verifier_worker

    got = []
    monkeypatch.setattr(verifier_worker, "main", lambda _redis, settings, *rest, **kw: got.append(settings.kv_memory))
    for given, expected in (("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("4096", 4096), (None, None)):
        args = ["worker", "verifier", "--model", "m"] + (["--kv-memory", given] if given else [])
        out = CliRunner().invoke(cli, args)
        assert out.exit_code == 0, out.output
        assert got.pop() == expected
    out = CliRunner().invoke(cli, ["worker", "verifier", "--model", "m", "--kv-memory", "lots"])
    assert out.exit_code != 0 and "kv_memory" in out.output
