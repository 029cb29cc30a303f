"""Lookahead drafting in the drafter service (zoo drafters, a real Redis): a draft prepared ahead goes to the
verifier as a bet, and the job that confirms it needs no reply."""

from __future__ import annotations

import time

import pytest

from cosine.broker import RedisSettings
from cosine.engine.draft_model import Drafter
from cosine.engine.fused_drafter import FusedDrafter, FusedRequest
from cosine.engine.runner import ModelRunner
from cosine.engine.tree import DraftTree
from cosine.keys import DRAFTERS_GROUP
from cosine.local_redis import LocalRedis
from cosine.protocol import Draft, DraftJob, decode_entry, entry
from cosine.service.drafter_service import DrafterService, DrafterSettings

EXPERTS = ["code", "prose"]


@pytest.fixture(scope="module")
def redis_url():
    with LocalRedis() as srv:
        yield srv.url


def _drafters(zoo_engine) -> dict[str, Drafter]:
    return {n: Drafter(ModelRunner(zoo_engine.drafters[n].runner.model, n), n) for n in EXPERTS}


def test_bets_go_to_the_verifier_and_the_job_confirming_one_needs_no_reply(redis_url, zoo_engine, zoo_prompts):
    """After replying, the drafter drafts the next round for the outcomes it expects and sends each to the
    verifier at once: first the whole draft accepted with its own guess of the bonus token, then rejections
    at a depth with its runner-up there; each the same tree as drafting from scratch on the assumed tokens.
    A job confirming a bet is answered with nothing; one confirming none is drafted anew."""
    vocab = int(zoo_engine.verifier.runner.model.config.vocab_size)
    service = DrafterService(RedisSettings(url=redis_url, prefix="ahead"), DrafterSettings("d0", ahead_rows=3),
                             _drafters(zoo_engine), vocab)
    fresh = FusedDrafter(_drafters(zoo_engine))  # the same models, drafting from scratch
    prompt = zoo_engine.tokenizer(zoo_prompts["prose"][0], add_special_tokens=False)["input_ids"]
    job = DraftJob("r", "v", len(prompt), 0, prompt, 3, experts=EXPERTS)
    [(_, first)] = service.draft_all([job])
    spine = [first.tokens[i] for i in DraftTree(first.tokens, first.parents).spine()]
    runners_up = service._last_draft["r"].runners_up
    assert len(runners_up) == 3 and all(alts and tok not in dict(alts) for alts, tok in zip(runners_up, spine))
    service.look_ahead([job])
    bets = [decode_entry(f, (Draft,), vocab) for _, f in service.streams.r.xrange(service.keys.verify("v"))]
    assert len(bets) == 3 and service.bets_sent == 3
    whole, *others = bets
    assert whole.assumed[:3] == spine and len(whole.assumed) == 4, "the spine and the guessed bonus token"
    for bet in others:  # rejected at depth j, a runner-up there in place of the spine's token
        j = len(bet.assumed)
        assert bet.assumed[: j - 1] == spine[: j - 1] and bet.assumed[-1] in dict(runners_up[j - 1])
    for bet in bets:  # the whole draft's bet as deep as the job asked, the others DRAFTER_AHEAD_DEPTH deep
        committed = prompt + bet.assumed
        assert bet.epoch == len(committed) and bet.lookahead and not bet.job_sent_ms
        depth = 3 if bet is whole else min(3, service.settings.ahead_depth)
        want = fresh.draft([FusedRequest("x", committed, depth, EXPERTS)])["x"]
        assert (bet.tokens, bet.parents, bet.sources) == (want.tree.tokens, want.tree.parents, want.tree.sources)
        assert bet.votes == want.votes
    bet = others[0]
    committed = prompt + bet.assumed
    confirming = DraftJob("r", "v", len(committed), len(prompt), bet.assumed, 3, experts=EXPERTS)
    assert service.draft_all([confirming]) == [(confirming, None)] and service.lookahead_hits == 1
    # The next bets assume the one just confirmed was accepted; a job with another outcome is drafted anew.
    service.look_ahead([confirming])
    other = committed + [(bet.tokens[0] + 1) % vocab, 7]
    missed = DraftJob("r", "v", len(other), len(committed), other[len(committed):], 2, experts=EXPERTS)
    [(_, reply)] = service.draft_all([missed])
    assert reply is not None and not reply.lookahead and service.lookahead_misses == 1
    want = fresh.draft([FusedRequest("y", other, 2, EXPERTS)])["y"]
    assert reply.tokens == want.tree.tokens
    service.release("r")
    assert not any(d.cached for d in service.drafters.values()), "the bets' rows go with the request"


def test_drafting_ahead_is_not_counted_as_busy(redis_url, zoo_engine, zoo_prompts):
    """The controller reads a drafter's busy share as its load; drafting ahead only fills idle time, so it is
    reported apart (``lookahead_s``), not as busy."""
    vocab = int(zoo_engine.verifier.runner.model.config.vocab_size)
    service = DrafterService(RedisSettings(url=redis_url, prefix="busy"), DrafterSettings("d0"),
                             _drafters(zoo_engine), vocab)
    streams = service.streams
    streams.ensure_group(service.stream, DRAFTERS_GROUP)
    prompt = zoo_engine.tokenizer(zoo_prompts["code"][0], add_special_tokens=False)["input_ids"]
    streams.r.xadd(service.stream, entry(DraftJob("r", "v", len(prompt), 0, prompt, 4, experts=EXPERTS)))
    batch = streams.read_batch(service.stream, DRAFTERS_GROUP, "d0", 8, 0, 100)
    t0 = time.perf_counter()
    service.handle(batch)
    wall = time.perf_counter() - t0
    assert service.requests["r"].ahead, "the job's next round was drafted ahead"
    info = service.info()
    assert info["busy_s"] > 0 and info["lookahead_s"] > 0
    assert info["busy_s"] + info["lookahead_s"] <= wall + 1e-3  # each second counted once


def test_a_job_coming_in_ends_drafting_ahead(redis_url, zoo_engine, zoo_prompts):
    """Drafting ahead is a bet: a job that arrives meanwhile must not wait for all of it."""
    vocab = int(zoo_engine.verifier.runner.model.config.vocab_size)
    service = DrafterService(RedisSettings(url=redis_url, prefix="yield"), DrafterSettings("d0"),
                             _drafters(zoo_engine), vocab)
    prompt = zoo_engine.tokenizer(zoo_prompts["prose"][0], add_special_tokens=False)["input_ids"]
    job = DraftJob("r", "v", len(prompt), 0, prompt, 4, experts=EXPERTS)
    service.draft_all([job])
    service.streams.r.xadd(service.stream, entry(DraftJob("s", "v", len(prompt), 0, prompt, 4, experts=EXPERTS)))
    service.look_ahead([job])  # stopped after one depth: the whole draft's bet holds only its guess, dropped
    assert all(b.depth and b.draft.tree.depth == 1 for b in service.requests["r"].ahead)
    service.requests["r"].ahead = []
    service.streams.r.delete(service.stream)
    service.look_ahead([job])
    whole = [b for b in service.requests["r"].ahead if b.depth == 0]
    assert len(whole) == 1 and whole[0].draft.tree.depth == 4
    # The fused drafter ends every tree at the last depth completed when asked to stop: it asks before every
    # expert's forward after the first depth, and a depth some experts did not draft is dropped.
    reqs = [FusedRequest("a", prompt, 5, EXPERTS), FusedRequest("b", prompt[:-3], 3, EXPERTS)]
    for stop_at, depth in ((len(EXPERTS) + 1, 2), (2, 1)):
        calls = []
        drafts = FusedDrafter(_drafters(zoo_engine)).draft(
            reqs, stop=lambda: calls.append(1) or len(calls) >= stop_at)  # noqa: B023 - used at once
        assert [drafts[s].tree.depth for s in ("a", "b")] == [depth, depth]
        assert all(len(v) == depth for v in drafts["a"].votes.values())
