"""KV rollback: after every accept/reject the cache equals the cache of recomputing the accepted prefix."""

from __future__ import annotations

import random

import pytest
import torch

from cosine.engine.draft_model import Drafter, DraftRequest
from cosine.engine.runner import ModelRunner, Segment, prefill_groups
from cosine.engine.sequence import Sequence
from cosine.engine.target import TargetVerifier
from cosine.engine.tree import DraftTree
from cosine.sampling_params import SamplingParams

from .helpers import KV_TOLERANCE, tiny_llama


def recomputed_kv(model, tokens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    fresh = ModelRunner(model)
    fresh.add_rows(["x"], [tokens])
    return [fresh.kv.layer_kv(i) for i in range(len(fresh.kv.cache.layers))]


def assert_row_matches(runner: ModelRunner, seq_id: str, tokens: list[int], tolerance=(2e-5, 1e-4)) -> None:
    row = runner.row_of(seq_id)
    slots = runner.kv.slots_of(row)
    assert len(slots) == len(tokens), "committed length differs from the accepted prefix"
    atol, rtol = tolerance
    for layer, (k_ref, v_ref) in enumerate(recomputed_kv(runner.model, tokens)):
        k, v = runner.kv.layer_kv(layer)
        torch.testing.assert_close(k[row, :, slots], k_ref[0], atol=atol, rtol=rtol)
        torch.testing.assert_close(v[row, :, slots], v_ref[0], atol=atol, rtol=rtol)


def random_tree(rng: random.Random, vocab: int, truth: list[int] | None = None) -> DraftTree:
    """A spine (sometimes following ``truth``) with alternatives, so that rounds accept some and reject some."""
    tree = DraftTree()
    parent = -1
    for depth in range(rng.randint(1, 4)):
        spine_tok = truth[depth] if truth and depth < len(truth) and rng.random() < 0.7 else rng.randrange(vocab)
        spine = tree.add(spine_tok, parent)
        for _ in range(rng.randint(0, 2)):
            tree.add(rng.randrange(vocab), parent)
        parent = spine
    return tree


@pytest.mark.parametrize("compact_every_step", [False, True])
def test_target_rollback_equals_recompute(compact_every_step):
    model = tiny_llama(vocab=53)
    rng = random.Random(0)
    verifier = TargetVerifier(ModelRunner(model), eos_id=None)
    seqs = [Sequence([rng.randrange(53) for _ in range(n)], SamplingParams(max_new_tokens=40)) for n in (1, 5, 12)]
    verifier.admit(seqs)
    for s in seqs:
        assert_row_matches(verifier.runner, s.seq_id, s.tokens[:-1])
    for _ in range(8):
        # Half the time the spine is the target's own greedy continuation, so some drafts are accepted.
        drafts = {}
        for s in seqs:
            ref = model.generate(torch.tensor([s.tokens]), max_new_tokens=4, do_sample=False)[0, len(s) :].tolist()
            drafts[s.seq_id] = random_tree(rng, 53, ref)
        verifier.step(drafts)
        if compact_every_step:
            verifier.runner.kv.compact()
        for s in seqs:
            assert_row_matches(verifier.runner, s.seq_id, s.tokens[:-1])
    assert sum(s.stats.accepted for s in seqs) > 0, "the scenario must exercise accepted drafts"
    assert sum(s.stats.drafted - s.stats.accepted for s in seqs) > 0, "and rejected ones"


def test_rows_leave_and_join_without_disturbing_others():
    model = tiny_llama(vocab=53, seed=1)
    verifier = TargetVerifier(ModelRunner(model), eos_id=None)
    a, b = Sequence([1, 2, 3]), Sequence([4, 5, 6, 7, 8])
    verifier.admit([a, b])
    verifier.step({a.seq_id: DraftTree.chain([9, 10]), b.seq_id: None})
    verifier.release([a.seq_id])
    c = Sequence([11])
    verifier.admit([c])
    verifier.step({b.seq_id: DraftTree.chain([12]), c.seq_id: DraftTree.chain([13, 14])})
    assert sorted(verifier.runner.row_ids) == sorted([b.seq_id, c.seq_id])
    for s in (b, c):
        assert_row_matches(verifier.runner, s.seq_id, s.tokens[:-1])


def test_many_rows_leave_from_anywhere_and_the_rest_keep_their_cache():
    model = tiny_llama(vocab=53, seed=4)
    rng = random.Random(5)
    verifier = TargetVerifier(ModelRunner(model), eos_id=None)
    seqs = [Sequence([rng.randrange(53) for _ in range(rng.randint(1, 9))], SamplingParams(max_new_tokens=60))
            for _ in range(7)]
    verifier.admit(seqs)
    live = list(seqs)
    for round_ in range(6):
        fed = live if round_ % 2 else live[::2]  # every other round a forward over some rows only
        verifier.step({s.seq_id: random_tree(rng, 53) for s in fed})
        gone = [live[i] for i in sorted(rng.sample(range(len(live)), k=min(2, len(live) - 1)))]
        verifier.release([s.seq_id for s in gone])
        live = [s for s in live if s not in gone]
        fresh = [Sequence([rng.randrange(53) for _ in range(rng.randint(1, 12))], SamplingParams(max_new_tokens=60))]
        verifier.admit(fresh)
        live += fresh
        assert sorted(verifier.runner.row_ids) == sorted(s.seq_id for s in live)
        assert verifier.runner.kv.rows == len(live)
        for s in live:
            assert_row_matches(verifier.runner, s.seq_id, s.tokens[:-1])


def test_drafter_rollback_equals_recompute():
    model = tiny_llama(vocab=53, seed=2)
    drafter = Drafter(ModelRunner(model), "d")
    rng = random.Random(3)
    tokens = {"s1": [5, 6, 7], "s2": [8]}
    for _ in range(6):
        trees = drafter.draft([DraftRequest(sid, toks, k=3, width=2) for sid, toks in tokens.items()])
        for sid in tokens:
            # The drafter fed every committed token, then its own spine (all but the last drafted token).
            assert drafter.cached[sid][: len(tokens[sid])] == tokens[sid]
            assert len(drafter.cached[sid]) == len(tokens[sid]) + 2
            assert_row_matches(drafter.runner, sid, drafter.cached[sid])
        for sid, tree in trees.items():
            # The verifier accepts a random prefix of the spine and adds a bonus token.
            spine, node = [], -1
            while (kids := tree.children(node)):
                node = kids[0]
                spine.append(tree.tokens[node])
            keep = rng.randint(0, len(spine))
            tokens[sid] = tokens[sid] + spine[:keep] + [rng.randrange(53)]


def test_zoo_target_rollback_equals_recompute(zoo_engine, zoo_prompts):
    engine = zoo_engine
    tok = engine.tokenizer
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in (zoo_prompts["code"][0], zoo_prompts["prose"][1])]
    verifier = TargetVerifier(ModelRunner(engine.verifier.runner.model), engine.eos_id)
    seqs = [Sequence(p, SamplingParams(max_new_tokens=24)) for p in prompts]
    verifier.admit(seqs)
    drafter = next(iter(engine.drafters.values()))
    for _ in range(4):
        trees = drafter.draft([DraftRequest(s.seq_id, s.tokens, k=4, width=2) for s in seqs])
        verifier.step(trees)
        for s in seqs:
            assert_row_matches(verifier.runner, s.seq_id, s.tokens[:-1], KV_TOLERANCE)
    drafter.release([s.seq_id for s in seqs])


def test_forward_over_some_rows_equals_forward_over_all():
    """A pass that feeds only some rows runs over those rows alone; its logits, and every row's cache after
    the commit (the rows left out included), are those of running every row."""
    model = tiny_llama(vocab=53, seed=4)
    rng = random.Random(5)
    prompts = [[rng.randrange(53) for _ in range(n)] for n in (2, 7, 4, 11, 5)]
    ids = [f"r{i}" for i in range(len(prompts))]
    runners = []
    for share in (0.0, 1.0):  # never / always run the fed rows alone
        runner = ModelRunner(model)
        runner.SUBSET_SHARE = share
        runner.add_rows(ids, prompts)
        runners.append(runner)
    full, alone = runners
    assert full.row_ids == alone.row_ids and sorted(full.row_ids) == ids  # rows in prefill-group order
    order = full.row_ids
    committed = {sid: list(p) for sid, p in zip(ids, prompts)}
    for _ in range(8):
        fed = set(rng.sample(ids, rng.randint(1, 3)))
        segments = []
        for sid in order:
            tree = random_tree(rng, 53) if sid in fed else None
            segments.append(None if tree is None else Segment(tree.tokens, tree.parents))
        keep = torch.zeros((len(ids), max(len(s) for s in segments if s)), dtype=torch.bool)
        outs = [runner.forward(segments) for runner in runners]
        for row, sid in enumerate(order):
            if segments[row] is None:
                continue
            n = len(segments[row])
            torch.testing.assert_close(outs[1][row, :n], outs[0][row, :n], atol=2e-5, rtol=1e-4)
            keep[row, 0] = True  # the tree's first node (a root) is committed
            committed[sid].append(segments[row].tokens[0])
        for runner in runners:
            runner.commit(keep)
    assert alone.rows_run < full.rows_run, "the subset path must have run"
    for sid in ids:
        for runner in runners:
            row = runner.row_of(sid)
            assert len(runner.kv.slots_of(row)) == len(committed[sid])
        assert_row_matches(alone, sid, committed[sid])


def test_prompts_of_very_different_lengths_are_prefilled_in_groups_not_padded_to_the_longest():
    assert prefill_groups([14, 297, 17, 265, 80, 60, 0]) == [[1, 3], [4, 5], [2, 0], [6]]
    assert prefill_groups([5, 5, 5]) == [[0, 1, 2]]  # equal lengths: one forward, in the order given
    model = tiny_llama(vocab=53, seed=8)
    rng = random.Random(9)
    prompts = {"short": [rng.randrange(53) for _ in range(3)], "long": [rng.randrange(53) for _ in range(40)],
               "mid": [rng.randrange(53) for _ in range(33)]}
    runner = ModelRunner(model)
    runner.add_rows(list(prompts), list(prompts.values()))
    assert runner.forwards == 2 and runner.slots_run == 2 * 40 + 3  # not 3 x 40
    assert runner.row_ids == ["long", "mid", "short"]
    for sid, toks in prompts.items():
        assert_row_matches(runner, sid, toks)


def test_last_node_logits_and_prefill_without_logits_match_the_full_forward():
    """``logits="last"`` (a drafter's step) gives each row the logits after its last node, ``"none"`` (a
    prefill) the same cache, on the full-rows path and on the subset path alike."""
    model = tiny_llama(vocab=53, seed=6)
    rng = random.Random(7)
    committed = {f"r{i}": [rng.randrange(53) for _ in range(2)] for i in range(4)}
    runners = {}
    for mode in ("all", "last", "none"):
        runner = ModelRunner(model)
        runner.add_rows(list(committed), list(committed.values()))
        runners[mode] = runner
    for fed in (list(committed), ["r1"]):  # every row, then one row alone (the subset path)
        feeds = {sid: [rng.randrange(53) for _ in range(rng.randint(1, 6))] for sid in fed}
        segments = [Segment.chain(feeds[sid]) if sid in feeds else None for sid in committed]
        out = {mode: runner.forward(segments, logits=mode) for mode, runner in runners.items()}
        assert out["none"] is None
        for row, seg in enumerate(segments):
            if seg is not None:
                torch.testing.assert_close(out["last"][row], out["all"][row, len(seg) - 1], atol=2e-5, rtol=1e-4)
        for runner in runners.values():
            runner.commit_segments(segments)
        for sid, toks in feeds.items():
            committed[sid] += toks
    for sid, toks in committed.items():
        for runner in runners.values():
            assert_row_matches(runner, sid, toks)
