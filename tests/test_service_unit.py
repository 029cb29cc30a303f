"""The verifier's rules, in milliseconds: its collaborators on an in-process fakeredis with the simulated
target engine (deterministic, no model), so a scheduling, admission or upkeep rule is checked without
processes or a real Redis.

fakeredis is faithful for what these tests use (non-blocking reads, MULTI, pending-entry bookkeeping,
XCLAIM); its blocking XREADGROUP with COUNT returns at once, which here only makes a turn faster. The same
behaviours run against a real redis-server and real worker processes in test_pipeline*.py.
"""

from __future__ import annotations

import time

import fakeredis
import msgpack
import pytest

from cosine import defaults
from cosine.broker import RedisSettings, now_ms, xadd_args
from cosine.client import build_request
from cosine.keys import VERIFIERS_GROUP, Keys
from cosine.protocol import Cancel, Chunk, Draft, DraftJob, GenerationRequest, decode_entry, encode, entry
from cosine.service.verifier_service import VerifierService, VerifierSettings
from cosine.sim.engines import SimModel, SimTarget, SimTokenizer

PROMPT = [16, 17, 18, 19]


@pytest.fixture
def connector():
    server = fakeredis.FakeServer()
    return lambda _settings: fakeredis.FakeRedis(server=server)


def make_verifier(connector, **overrides) -> VerifierService:
    settings = VerifierSettings("v0", **overrides)
    return VerifierService(RedisSettings(prefix="t"), settings, SimTarget(SimModel(), time_scale=0),
                           SimTokenizer(), connector=connector)


def submit(svc: VerifierService, **params) -> GenerationRequest:
    msg = build_request(PROMPT, **params)
    svc.streams.add(svc.keys.requests, msg)
    return msg


def chunks(svc: VerifierService, rid: str) -> list[Chunk]:
    return [decode_entry(f, (Chunk,)) for _, f in svc.streams.entries(svc.keys.out(rid))]


def jobs(svc: VerifierService, drafter: str = "d0") -> list[DraftJob]:
    return [decode_entry(f, (DraftJob,)) for _, f in svc.streams.entries(svc.keys.draft(drafter))
            if decode_entry(f).TYPE == "draft_job"]


def truth(n: int) -> list[int]:
    return SimModel().continuation(PROMPT, n)


def drafter_alive(svc: VerifierService, worker: str = "d0", experts: str = "code") -> None:
    svc.streams.heartbeat(worker, {"role": "drafter", "experts": experts})


def pending(svc: VerifierService, stream: str) -> int:
    return svc.streams.r.xpending(stream, VERIFIERS_GROUP)["pending"]


def test_a_turn_admits_sends_a_job_then_verifies_the_draft_in_one_write(connector):
    svc = make_verifier(connector)
    drafter_alive(svc)
    svc.recover_own()
    msg = submit(svc, max_new_tokens=12, speculation=3)
    svc.step()
    assert msg.request_id in svc.active
    [job] = jobs(svc)
    assert (job.epoch, job.base, job.tokens, job.k) == (len(PROMPT), 0, PROMPT, 3)
    draft = Draft(msg.request_id, "d0", job.epoch, truth(3), [-1, 0, 1], [0.9] * 3, ["code"] * 3)
    svc.streams.add(svc.drafts.stream, draft)
    svc.step()
    [chunk] = chunks(svc, msg.request_id)
    assert chunk.token_ids == truth(4)  # three accepted and the target's own
    assert pending(svc, svc.drafts.stream) == 0, "the draft was acknowledged with the output"
    nxt = jobs(svc)[-1]
    assert (nxt.epoch, nxt.base, nxt.tokens) == (len(PROMPT) + 4, len(PROMPT), truth(4)), "only new tokens go out"


def test_stale_and_foreign_drafts_are_dropped_and_a_late_one_costs_a_plain_step(connector):
    svc = make_verifier(connector, draft_budget_min_ms=60_000, draft_budget_max_ms=60_000)
    drafter_alive(svc)
    svc.recover_own()
    msg = submit(svc, max_new_tokens=12, speculation=3)
    svc.step()
    stale = Draft(msg.request_id, "d0", len(PROMPT) + 1, truth(2), [-1, 0], [0.9] * 2, ["code"] * 2)
    foreign = Draft(msg.request_id, "d9", len(PROMPT), truth(2), [-1, 0], [0.9] * 2, ["code"] * 2)
    for d in (stale, foreign):
        svc.streams.add(svc.drafts.stream, d)
    svc.step()
    assert svc.metrics.counters["stale_drafts"] == 2 and not chunks(svc, msg.request_id)
    assert pending(svc, svc.drafts.stream) == 0, "dropped drafts are acknowledged too"
    svc.settings.draft_budget_min_ms = svc.settings.draft_budget_max_ms = 0.0  # the job's draft is late now
    svc.step()
    [chunk] = chunks(svc, msg.request_id)
    assert chunk.token_ids == truth(1) and svc.metrics.counters["late_drafts"] == 1


def test_a_bet_on_the_outcome_is_the_next_draft_without_a_round_trip_and_a_wrong_one_is_dropped(connector):
    """Bets the drafter sent ahead wait for the pass: the one whose assumed tokens were committed is the next
    round's draft at once (cut to the positions the round gets); a bet on another outcome is dropped."""
    svc = make_verifier(connector)
    drafter_alive(svc)
    svc.recover_own()
    msg = submit(svc, max_new_tokens=20, speculation=3)
    svc.step()
    [job] = jobs(svc)
    after = truth(4)  # the draft below is accepted whole, then the target adds its own token
    draft = Draft(msg.request_id, "d0", job.epoch, after[:3], [-1, 0, 1], [0.9] * 3, ["code"] * 3)
    right = Draft(msg.request_id, "d0", job.epoch + 4, truth(9)[4:9], [-1, 0, 1, 2, 3], [0.9] * 5, ["code"] * 5,
                  assumed=after, lookahead=True)
    wrong = Draft(msg.request_id, "d0", job.epoch + 4, truth(6)[4:6], [-1, 0], [0.9] * 2, ["code"] * 2,
                  assumed=after[:3] + [(after[3] + 1) % 50], lookahead=True)
    for d in (draft, wrong, right):
        svc.streams.add(svc.drafts.stream, d)
    svc.step()
    st = svc.active[msg.request_id]
    assert chunks(svc, msg.request_id)[0].token_ids == after
    assert st.drafting.draft is not None and st.drafting.draft.tokens == truth(7)[4:7], "the bet, cut to k=3"
    assert svc.metrics.counters["bets_taken"] == 1 and st.drafting.bets == []
    assert jobs(svc)[-1].epoch == job.epoch + 4, "the job still goes out: the drafter learns the outcome"
    svc.step()  # verified at once, no draft awaited
    assert [c.token_ids for c in chunks(svc, msg.request_id)][1] == truth(8)[4:8]


def test_the_first_draft_job_goes_out_before_the_prefill(connector):
    """The drafter prefills its rows and drafts while the target prefills: the job is sent first."""
    svc = make_verifier(connector)
    drafter_alive(svc)
    svc.recover_own()
    seen = []
    prefill = svc.engine.admit
    svc.engine.admit = lambda seqs: seen.append(len(jobs(svc))) or prefill(seqs)
    submit(svc, max_new_tokens=8, speculation=3)
    svc.step()
    assert seen == [1] and len(svc.active) == 1


def test_a_request_past_its_deadline_ends_with_timeout_and_frees_its_row(connector):
    svc = make_verifier(connector)
    svc.recover_own()
    msg = submit(svc, max_new_tokens=50)
    svc.step()
    st = svc.active[msg.request_id]
    st.msg.deadline_ms = now_ms() - 1000  # clearly past: the broker-clock estimate may be off by a few ms
    svc.upkeep.deadlines()
    chunk = chunks(svc, msg.request_id)[-1]
    assert chunk.finished and chunk.finish_reason == "timeout"
    assert msg.request_id not in svc.active and msg.request_id not in svc.engine.seqs
    assert pending(svc, svc.keys.requests) == 0
    assert svc.streams.r.pttl(svc.keys.out(msg.request_id)) > 0, "a finished output stream expires"


def test_cancellation_before_and_after_admission(connector):
    svc = make_verifier(connector)
    svc.recover_own()
    running = submit(svc, max_new_tokens=50)
    svc.step()
    early = build_request(PROMPT, max_new_tokens=50)
    svc.streams.r.set(svc.keys.cancelled(early.request_id), b"1")
    for rid in (running.request_id, "someone-else"):
        svc.streams.add(svc.keys.cancel, Cancel(rid))
    svc.streams.r.xadd(svc.keys.cancel, {b"d": b"garbage"})  # ignored, not fatal
    svc.upkeep.cancellations()
    assert chunks(svc, running.request_id)[-1].finish_reason == "cancelled"
    svc.streams.add(svc.keys.requests, early)
    svc.step()
    [chunk] = chunks(svc, early.request_id)
    assert chunk.finish_reason == "cancelled" and not svc.active


def test_a_prefill_that_fails_ends_its_request_with_an_error_and_spares_the_others(connector):
    """Fault injected at the engine's prefill for one request of a batch: it ends with an explicit error and
    its entry is acknowledged (a restart does not re-admit it); the request admitted with it is served."""
    svc = make_verifier(connector)
    svc.recover_own()
    good, bad = build_request(PROMPT, max_new_tokens=6), build_request(PROMPT, max_new_tokens=6)
    for m in (good, bad):
        svc.streams.add(svc.keys.requests, m)
    prefill = svc.engine.admit

    def failing(seqs):
        if any(s.seq_id == bad.request_id for s in seqs):
            raise RuntimeError("out of memory")
        prefill(seqs)

    svc.engine.admit = failing
    svc.step()
    assert list(svc.active) == [good.request_id]
    [chunk] = chunks(svc, bad.request_id)
    assert chunk.finished and chunk.finish_reason == "error" and "out of memory" in chunk.error
    assert pending(svc, svc.keys.requests) == 1, "only the good request's entry stays pending"
    while svc.active:
        svc.step()
    assert chunks(svc, good.request_id)[-1].token_ids and pending(svc, svc.keys.requests) == 0
    again = make_verifier(connector)
    again.recover_own()
    assert not again.active


def test_a_second_entry_for_the_same_request_is_acknowledged_and_served_once(connector):
    """A retried submit can add a request twice: it is prefilled once, both entries end acknowledged."""
    svc = make_verifier(connector)
    svc.recover_own()
    msg = build_request(PROMPT, max_new_tokens=6)
    for _ in range(2):
        svc.streams.add(svc.keys.requests, msg)
    svc.step()
    assert list(svc.active) == [msg.request_id] and svc.metrics.counters["duplicate_requests"] == 1
    assert pending(svc, svc.keys.requests) == 1
    svc.streams.add(svc.keys.requests, msg)  # a third, while the request is served
    while svc.active:
        svc.step()
    assert pending(svc, svc.keys.requests) == 0 and svc.metrics.counters["duplicate_requests"] == 2
    tokens = [t for c in chunks(svc, msg.request_id) for t in c.token_ids]
    assert tokens == truth(6), "one stream of output, no chunk twice"


def test_a_drafter_no_live_worker_hosts_is_refused_by_name(connector):
    svc = make_verifier(connector)
    svc.recover_own()
    alone = submit(svc, max_new_tokens=4, drafter="nope")  # no drafter worker known yet: decoded alone
    svc.step()
    assert alone.request_id in svc.active
    drafter_alive(svc, experts="code,prose")
    svc.drafts.refresh(force=True)
    typo, pinned = submit(svc, max_new_tokens=4, drafter="nope"), submit(svc, max_new_tokens=4, drafter="code")
    svc.step()
    [chunk] = chunks(svc, typo.request_id)
    assert chunk.finish_reason == "error" and chunk.error_type == "invalid_request"
    assert "'nope'" in chunk.error and "'code'" in chunk.error and "'prose'" in chunk.error
    assert pinned.request_id in svc.active


def test_an_entry_whose_read_reply_was_lost_is_admitted_by_the_live_verifier(connector):
    """A read delivered an entry to this verifier but the reply never reached it: no reclaim sweep takes
    entries of a live consumer, so the verifier reads its own strays again."""
    svc = make_verifier(connector, reclaim_interval_s=0.01)
    svc.recover_own()
    msg = build_request(PROMPT, max_new_tokens=4)
    svc.streams.add(svc.keys.requests, msg)
    svc.streams.read_group(svc.keys.requests, VERIFIERS_GROUP, "v0", 10, None)  # the reply that got lost
    svc.step()
    assert msg.request_id in svc.active and svc.metrics.counters["strays"] == 1
    while svc.active:
        svc.step()
    assert chunks(svc, msg.request_id)[-1].finished and pending(svc, svc.keys.requests) == 0
    assert svc.metrics.counters["strays"] == 1, "an entry it serves or holds is no stray"


def test_a_request_taken_over_by_another_verifier_is_let_go_without_a_write(connector):
    svc = make_verifier(connector)
    svc.recover_own()
    msg = submit(svc, max_new_tokens=50)
    svc.step()
    eid = svc.active[msg.request_id].entry_id
    svc.streams.r.xclaim(svc.keys.requests, VERIFIERS_GROUP, "v1", 0, [eid])
    written = len(chunks(svc, msg.request_id))
    svc.upkeep.refresh_ownership()
    assert not svc.active and svc.metrics.counters["lost_ownership"] == 1
    assert len(chunks(svc, msg.request_id)) == written


def test_reclaim_takes_a_dead_verifiers_requests_and_dead_letters_poison(connector):
    svc = make_verifier(connector, reclaim_min_idle_s=0.0, max_deliveries=3)
    svc.recover_own()
    svc.streams.heartbeat("v0", {"role": "verifier"})
    orphan, poison = build_request(PROMPT, max_new_tokens=8), build_request(PROMPT, max_new_tokens=8)
    ids = [svc.streams.add(svc.keys.requests, m) for m in (orphan, poison)]
    svc.streams.read_group(svc.keys.requests, VERIFIERS_GROUP, "dead", 10, None)
    for _ in range(2):
        svc.streams.r.xclaim(svc.keys.requests, VERIFIERS_GROUP, "dead", 0, [ids[1]])  # delivered 3 times
    time.sleep(0.005)  # fakeredis counts an entry idle for 0 ms as not idle at all
    got = svc.upkeep.reclaim()
    assert [eid for eid, _ in got] == [ids[0]]
    [chunk] = chunks(svc, poison.request_id)
    assert chunk.finish_reason == "error" and "delivered 3+ times" in chunk.error
    [(_, letter)] = svc.streams.entries(svc.keys.dlq)
    assert b"delivered" in letter[b"reason"] and letter[b"orig:d"] == entry(poison)[b"d"]
    assert not svc.upkeep.reclaim(), "one sweep per interval, whoever runs it"


def test_admission_rejects_malformed_entries_and_resumes_earlier_output(connector):
    svc = make_verifier(connector, admit_per_tick=3)
    svc.recover_own()
    bad = build_request(PROMPT, max_new_tokens=8)
    body = msgpack.unpackb(encode(bad))
    body["params"]["max_new_tokens"] = -1
    svc.streams.add(svc.keys.requests, {b"d": msgpack.packb(body)})
    done, resumed = build_request(PROMPT, max_new_tokens=8), build_request(PROMPT, max_new_tokens=8)
    pipe = svc.streams.transaction()
    svc.streams.add_output(pipe, Chunk(done.request_id, 0, 0, truth(8), "", True, "length"))
    svc.streams.add_output(pipe, Chunk(resumed.request_id, 0, 0, truth(3), "t", False))
    pipe.execute()
    for m in (done, resumed):
        svc.streams.add(svc.keys.requests, m)
    svc.step()
    [rejected] = chunks(svc, bad.request_id)
    assert rejected.error_type == "invalid_request" and "max_new_tokens" in rejected.error
    assert done.request_id not in svc.active and len(chunks(svc, done.request_id)) == 1
    assert svc.active[resumed.request_id].seq.output_ids == truth(4), "resumed at 3 tokens, then one plain step"
    nxt = chunks(svc, resumed.request_id)[-1]
    assert (nxt.seq, nxt.offset, nxt.token_ids) == (1, 3, truth(4)[3:]), "the stream continues, no duplicates"
    assert svc.metrics.counters["resumed"] == 1 and svc.metrics.counters["dead_lettered"] == 1


def test_without_a_drafter_worker_requests_decode_alone_and_move_to_one_that_appears(connector):
    svc = make_verifier(connector)
    svc.recover_own()
    msg = submit(svc, max_new_tokens=6)
    svc.step()
    assert chunks(svc, msg.request_id)[0].token_ids == truth(1) and svc.metrics.counters["plain_steps"] >= 1
    drafter_alive(svc, "d1", "prose")
    svc.drafts.refresh(force=True)
    svc.step()
    svc.step()
    assert svc.active[msg.request_id].drafting.worker == "d1"
    [job] = jobs(svc, "d1")
    assert job.base == 0 and job.tokens == PROMPT + truth(len(job.tokens) - len(PROMPT)), "a new worker gets all"


def test_each_kind_of_stream_has_its_cap():
    keys = Keys("t")
    cap = {k: xadd_args(keys, k, {b"x": b"1"})["maxlen"] for k in
           (keys.requests, keys.draft("d"), keys.out("r"), keys.dlq, keys.cancel, keys.votes("d"), keys.control_log)}
    assert cap[keys.requests] == cap[keys.draft("d")] == cap[keys.out("r")] == defaults.STREAM_MAXLEN
    assert (cap[keys.dlq], cap[keys.cancel], cap[keys.votes("d")], cap[keys.control_log]) == (
        defaults.DLQ_MAXLEN, defaults.CANCEL_MAXLEN, defaults.VOTE_STREAM_MAXLEN, defaults.CONTROL_LOG_MAXLEN)


def test_a_dead_letter_keeps_a_bounded_sample_of_the_entry(connector):
    svc = make_verifier(connector)
    huge = {f"f{i}".encode(): b"x" * (3 * defaults.DLQ_FIELD_BYTES) for i in range(40)}
    eid = svc.streams.r.xadd(svc.keys.requests, huge)
    svc.streams.dead_letter(svc.keys.requests, None, eid, huge, "junk")
    [(_, letter)] = svc.streams.entries(svc.keys.dlq)
    kept = {k: v for k, v in letter.items() if k.startswith(b"orig:")}
    assert len(kept) == 16 and all(len(v) == defaults.DLQ_FIELD_BYTES for v in kept.values())
    assert letter[b"size:f0"] == str(3 * defaults.DLQ_FIELD_BYTES).encode()


def test_an_open_output_stream_expires_unless_written_to(connector):
    """Every chunk renews its stream's expiry, so a request nobody ends does not leave its stream forever."""
    svc = make_verifier(connector)
    drafter_alive(svc)
    svc.recover_own()
    msg = submit(svc, max_new_tokens=40, speculation=0)
    svc.step()
    svc.step()
    key = svc.keys.out(msg.request_id)
    assert chunks(svc, msg.request_id) and not chunks(svc, msg.request_id)[-1].finished
    assert 0 < svc.streams.r.pttl(key) <= defaults.OUTPUT_OPEN_TTL_S * 1000
    while svc.active:
        svc.step()
    assert svc.streams.r.pttl(key) <= defaults.OUTPUT_TTL_S * 1000


def test_liveness_uses_the_brokers_clock_not_the_hosts(connector, monkeypatch):
    """A worker whose host clock is 10 s behind still looks alive; one silent for longer than the dead-after
    time looks dead whatever a host's clock says."""
    import cosine.broker as broker

    svc = make_verifier(connector)
    real = broker.now_ms
    monkeypatch.setattr(broker, "now_ms", lambda: real() - 10_000)  # the drafter's host: 10 s behind
    drafter_alive(svc, "d-behind")
    monkeypatch.setattr(broker, "now_ms", lambda: real() + 10_000)  # the reader's host: 10 s ahead
    assert "d-behind" in svc.streams.live_workers("drafter")
    svc.streams.r.zadd(svc.keys.workers, {"d-gone": svc.streams.server_ms() - 60_000})
    assert "d-gone" not in svc.streams.live_workers()


def test_workers_long_dead_are_forgotten_with_their_streams(connector):
    """Workers named by pid never come back: after WORKER_FORGET_AFTER_S of silence their registry entry and
    own streams go, and their request-group consumer once nothing is pending for it."""
    svc = make_verifier(connector, reclaim_interval_s=0.01, reclaim_min_idle_s=0.0)
    svc.recover_own()
    s = svc.streams
    long_ago = s.server_ms() - int(defaults.WORKER_FORGET_AFTER_S * 1000) - 1000
    for w in ("drafter-123", "verifier-456"):
        s.heartbeat(w, {"role": "drafter" if w.startswith("d") else "verifier"})
        s.r.zadd(svc.keys.workers, {w: long_ago})
    s.r.xadd(svc.keys.draft("drafter-123"), {b"x": b"1"})
    s.r.xadd(svc.keys.verify("verifier-456"), {b"x": b"1"})
    submit(svc, max_new_tokens=4)
    s.read_group(svc.keys.requests, VERIFIERS_GROUP, "verifier-456", 10, None)  # still pending for it
    drafter_alive(svc, "drafter-live")
    assert s.forget_dead_workers() == ["drafter-123"]
    assert not s.r.exists(svc.keys.draft("drafter-123"), svc.keys.worker("drafter-123"))
    assert s.r.exists(svc.keys.verify("verifier-456")) and "drafter-live" in s.live_workers()
    time.sleep(0.005)
    got = svc.upkeep.reclaim()  # the dead verifier's request moves here; then it is forgotten too
    assert len(got) == 1
    assert s.forget_dead_workers() == ["verifier-456"]
    names = [c["name"] for c in s.r.xinfo_consumers(svc.keys.requests, VERIFIERS_GROUP)]
    assert b"verifier-456" not in names
