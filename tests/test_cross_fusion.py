"""Fusion across drafter workers on a real Redis: the lead's asks, a peer's answers, resyncs and timeouts
(zoo models in this process), and the whole pipeline with one expert per worker process, a peer killed
mid-run included."""

from __future__ import annotations

import contextlib
import signal
import threading

import pytest

from cosine.broker import RedisSettings
from cosine.client import Client
from cosine.deployment import Deployment, WorkerSpec
from cosine.engine.draft_model import Drafter
from cosine.engine.fused_drafter import FusedDrafter, FusedRequest
from cosine.engine.runner import ModelRunner
from cosine.keys import Keys
from cosine.local_redis import LocalRedis
from cosine.protocol import Vote, VoteAsk, decode_entry, entry
from cosine.service.cross_fusion import RedisRemoteExperts, VoteServer, prefix_check
from cosine.zoo import paths

from .helpers import greedy_divergences, target_outputs
from .pipeline_helpers import committed_tokens, streams, wait_for

EXPERTS = ["code", "prose", "records"]


@pytest.fixture(scope="module")
def redis_server():
    with LocalRedis() as srv:
        yield srv


@pytest.fixture(scope="module")
def vocab(zoo_engine) -> int:
    return int(zoo_engine.verifier.runner.model.config.vocab_size)


@pytest.fixture(scope="module")
def prompts(zoo_engine, zoo_prompts) -> list[list[int]]:
    tok = zoo_engine.tokenizer
    texts = [zoo_prompts[d][i] for i in range(2) for d in sorted(zoo_prompts)]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _fresh(zoo_engine, names) -> dict[str, Drafter]:
    """New drafters over the zoo's weights (their own KV rows, so batches are the same on both sides)."""
    return {n: Drafter(ModelRunner(zoo_engine.drafters[n].runner.model, n), n) for n in names}


@contextlib.contextmanager
def _peer(url: str, prefix: str, worker: str, drafters: dict[str, Drafter], vocab: int):
    server = VoteServer(RedisSettings(url=url, prefix=prefix), worker, drafters, threading.Lock(), vocab)
    server.start()
    assert server.ready.wait(10)
    try:
        yield server
    finally:
        server.stop()
        server.join(5)


def _lead(url: str, prefix: str, vocab: int, timeout_ms: float = 2000.0) -> RedisRemoteExperts:
    return RedisRemoteExperts(streams(url, prefix), "lead", vocab, timeout_ms)


def _same(a, b) -> None:
    assert (a.tree.tokens, a.tree.parents, a.tree.sources) == (b.tree.tokens, b.tree.parents, b.tree.sources)
    assert a.tree.confidences == pytest.approx(b.tree.confidences, abs=1e-6)
    assert a.votes == b.votes


def test_remote_experts_draft_the_same_tree_as_local_ones(redis_server, zoo_engine, prompts, vocab):
    """One lead hosting code, a peer hosting prose and records: the same fused trees as one process with all
    three, round after round (the second round sends only the new tokens)."""
    prefix = "xf-same"
    local = FusedDrafter(_fresh(zoo_engine, EXPERTS))
    lead = FusedDrafter(_fresh(zoo_engine, ["code"]))
    remote = _lead(redis_server.url, prefix, vocab)
    with _peer(redis_server.url, prefix, "peer", _fresh(zoo_engine, ["prose", "records"]), vocab) as peer:
        for i, p in enumerate(prompts):
            sid = f"r{i}"
            remote.route({sid: {"prose": "peer", "records": "peer"}})
            tokens = list(p)
            for _ in range(2):  # one request at a time: the same batch on both sides, bit for bit
                want = local.draft([FusedRequest(sid, tokens, 4, EXPERTS)])[sid]
                got = lead.draft([FusedRequest(sid, tokens, 4, EXPERTS)], remote=remote)[sid]
                _same(got, want)
                tokens = tokens + want.votes["prose"][:2] + [7]
            local.release([sid])
            lead.release([sid])
    assert remote.rounds == 4 * 2 * len(prompts) and remote.timeouts == 0 and remote.resyncs == 0
    assert peer.served == 2 * remote.rounds and remote.asks == peer.served


def test_a_silent_peer_drops_out_and_a_forgetful_one_resyncs(redis_server, zoo_engine, prompts, vocab):
    prefix = "xf-faults"
    sid = "r0"
    alone = FusedDrafter(_fresh(zoo_engine, ["code"]))
    lead = FusedDrafter(_fresh(zoo_engine, ["code"]))
    # Nobody serves "ghost": after the timeout its expert leaves the draft, which is the lead's alone.
    remote = _lead(redis_server.url, prefix, vocab, timeout_ms=50)
    remote.route({sid: {"prose": "ghost"}})
    want = alone.draft([FusedRequest(sid, prompts[0], 4, ["code"])])[sid]
    got = lead.draft([FusedRequest(sid, prompts[0], 4, ["code", "prose"])], remote=remote)[sid]
    assert got.tree.tokens == want.tree.tokens and got.votes == {"code": want.votes["code"], "prose": []}
    assert remote.timeouts == 1 and remote.rounds == 1
    # A peer that lost what it was sent (a restart) answers resync; the next draft starts it afresh.
    remote = _lead(redis_server.url, prefix, vocab)
    remote.route({sid: {"prose": "peer"}})
    with _peer(redis_server.url, prefix, "peer", _fresh(zoo_engine, ["prose"]), vocab) as peer:
        first = lead.draft([FusedRequest(sid, prompts[0], 4, ["code", "prose"])], remote=remote)[sid]
        assert len(first.votes["prose"]) == 4
        peer.known.clear()
        tokens = prompts[0] + first.votes["code"][:1] + [7]
        second = lead.draft([FusedRequest(sid, tokens, 4, ["code", "prose"])], remote=remote)[sid]
        assert remote.resyncs == 1 and second.votes["prose"] == []
        third = lead.draft([FusedRequest(sid, tokens, 4, ["code", "prose"])], remote=remote)[sid]
        assert len(third.votes["prose"]) == 4 and peer.resyncs == 1
    lead.release([sid])
    alone.release([sid])


def test_bad_asks_are_dead_lettered_and_the_peer_keeps_answering(redis_server, zoo_engine, prompts, vocab):
    prefix = "xf-bad"
    keys = Keys(prefix)
    s = streams(redis_server.url, prefix)
    with _peer(redis_server.url, prefix, "peer", _fresh(zoo_engine, ["prose"]), vocab):
        s.r.xadd(keys.ask("peer"), {b"d": b"\xc1 not msgpack"})
        s.r.xadd(keys.ask("peer"), entry(VoteAsk("r1", "lead", 1, "prose", 0, [vocab + 5])))
        s.r.xadd(keys.ask("peer"), entry(VoteAsk("r2", "lead", 2, "prose", 3, [5], check=prefix_check([1, 2, 3], 3))))
        s.r.xadd(keys.ask("peer"), entry(VoteAsk("r3", "lead", 3, "prose", 0, prompts[0][:20], width=2)))
        votes = wait_for(lambda: [decode_entry(f, (Vote,)) for _, f in s.r.xrange(keys.votes("lead"))]
                         if s.r.xlen(keys.votes("lead")) >= 2 else None, 30, what="the peer's answers")
        assert wait_for(lambda: s.r.xlen(keys.dlq) >= 2, 10, what="dead letters")
    by_ticket = {v.ticket: v for v in votes}
    assert by_ticket[2].resync and not by_ticket[2].tokens  # base 3 it never saw: resync
    assert len(by_ticket[3].tokens) == 2 and by_ticket[3].probs[0] >= by_ticket[3].probs[1]
    reasons = [f[b"reason"].decode() for _, f in s.r.xrange(keys.dlq)]
    assert any("not msgpack" in r for r in reasons) and any("vocabulary" in r for r in reasons)


# -- the pipeline: one expert per drafter process ---------------------------------------------------------
def _deployment(url: str, prefix: str, log_dir: str, zoo_root) -> Deployment:
    specs = [WorkerSpec("verifier", "verifier-0", ["--cross-process-fusion"])]
    specs += [WorkerSpec("drafter", f"drafter-{e}", ["--model", f"{e}={paths.drafter_dir(e, zoo_root)}"])
              for e in EXPERTS]
    return Deployment(specs, redis_url=url, prefix=prefix, log_dir=log_dir, device="cpu", dtype="float32")


def _reference(zoo_engine, texts, n):
    ids = [zoo_engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return ids, target_outputs(zoo_engine, ids, n)


@pytest.mark.slow
def test_pipeline_fuses_experts_of_three_workers_and_survives_a_killed_peer(
        redis_server, zoo_engine, zoo_prompts, zoo_root, tmp_path):
    prefix = "xf-pipe"
    texts = [zoo_prompts[d][i] for i in range(4) for d in sorted(zoo_prompts)]
    n = 40
    with _deployment(redis_server.url, prefix, str(tmp_path), zoo_root) as dep, \
            Client(redis_server.url, prefix=prefix) as c:
        first = [c.generate(t, max_new_tokens=n, timeout=240) for t in texts[:6]]
        drafters = streams(redis_server.url, prefix)

        def voted() -> bool:  # experts of other workers took part (heartbeats may lag by HEARTBEAT_INTERVAL_S)
            info = drafters.live_workers("drafter").values()
            return sum(int(w.get("vote_asks", 0)) for w in info) > 0 and \
                sum(int(w.get("votes_served", 0)) for w in info) > 0

        wait_for(voted, 5, what="drafters' heartbeats to count votes asked and served")
        # Kill a drafter mid-run: drafts go on without its expert, the output stays the target's.
        ids = [c.submit(t, max_new_tokens=n, timeout=240) for t in texts[6:]]
        wait_for(lambda: committed_tokens(redis_server.url, ids, prefix, owner=c.owner) >= 30, 120, what="progress")
        dep.kill("drafter-prose", signal.SIGKILL)
        second = [c.result(rid, timeout=240) for rid in ids]
    results = first + second
    assert all(r.finish_reason == "length" for r in results)
    ids, refs = _reference(zoo_engine, texts, n)
    ties, failures = greedy_divergences(zoo_engine.verifier.runner.model, ids, [r.token_ids for r in results], refs)
    assert not failures, failures
    assert sum(r.stats["accepted"] for r in results) > 0
