"""Confidence-based token fusion: the per-position rule, the lockstep FusedDrafter on the zoo, and the
engine's fused path (lossless, and at least as long accepted drafts as a single domain drafter)."""

from __future__ import annotations

import pytest

from cosine.engine.draft_model import Drafter, DraftRequest
from cosine.engine.fused_drafter import FusedDrafter, FusedRequest
from cosine.engine.runner import ModelRunner
from cosine.engine.speculative import ROUTE, SpecConfig
from cosine.policy.fusion import fuse_position
from cosine.sampling_params import SamplingParams

from .helpers import MAX_NEAR_TIE_SHARE, greedy_divergences

EXPERTS = ["code", "prose", "records"]
NEW_TOKENS = 32


# -- fuse_position ------------------------------------------------------------------------------------
def test_agreement_gives_one_spine_and_further_candidates_as_alternatives():
    fused = fuse_position({"a": [(5, 0.9), (6, 0.05)], "b": [(5, 0.7), (8, 0.2)]}, max_alternatives=4)
    assert (fused.spine_token, fused.spine_source, fused.spine_confidence) == (5, "a", 0.9)
    assert fused.agreed == ["a", "b"]
    assert fused.alternatives == [(8, 0.2, "b"), (6, 0.05, "a")]


def test_disagreement_becomes_siblings_top1_first():
    fused = fuse_position({"a": [(5, 0.9), (6, 0.8)], "b": [(7, 0.3)], "c": [(9, 0.6)]}, max_alternatives=5)
    assert fused.spine_token == 5 and fused.agreed == ["a"]
    # Other drafters' first choices come before anyone's second choice, each group by confidence.
    assert fused.alternatives == [(9, 0.6, "c"), (7, 0.3, "b"), (6, 0.8, "a")]


def test_a_token_keeps_its_best_confidence_and_source():
    fused = fuse_position({"a": [(5, 0.9), (7, 0.4)], "b": [(7, 0.6)]}, max_alternatives=3)
    assert fused.alternatives == [(7, 0.6, "b")]


def test_ties_are_broken_by_drafter_name():
    one = fuse_position({"b": [(7, 0.5)], "a": [(5, 0.5)]}, max_alternatives=3)
    two = fuse_position({"a": [(5, 0.5)], "b": [(7, 0.5)]}, max_alternatives=3)
    assert one == two
    assert (one.spine_token, one.spine_source) == (5, "a")
    tied = fuse_position({"c": [(1, 0.9)], "b": [(3, 0.2)], "a": [(2, 0.2)]}, max_alternatives=3)
    assert [alt[0] for alt in tied.alternatives] == [2, 3]


def test_single_drafter_keeps_its_candidate_order():
    fused = fuse_position({"a": [(4, 0.4), (9, 0.3), (2, 0.3), (1, 0.0)]}, max_alternatives=3)
    assert [alt[0] for alt in fused.alternatives] == [9, 2, 1]


def test_cap_on_alternatives():
    cands = {"a": [(1, 0.9), (2, 0.5)], "b": [(3, 0.4)], "c": [(4, 0.3)]}
    assert [t for t, _, _ in fuse_position(cands, 1).alternatives] == [3]
    assert fuse_position(cands, 0).alternatives == []
    assert len(fuse_position(cands, 10).alternatives) == 3


def test_no_candidates_is_an_error():
    with pytest.raises(ValueError):
        fuse_position({"a": []}, 2)


# -- FusedDrafter on the zoo ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_ids(zoo_engine, zoo_prompts) -> dict[str, list[list[int]]]:
    tok = zoo_engine.tokenizer
    return {d: [tok(t, add_special_tokens=False)["input_ids"] for t in zoo_prompts[d][:4]] for d in sorted(zoo_prompts)}


@pytest.fixture
def engine(zoo_engine):
    saved = zoo_engine.config
    zoo_engine.config = SpecConfig(k=4)
    yield zoo_engine
    zoo_engine.config = saved


def _spine(tree) -> list[int]:
    """Nodes on the spine: the first child at every depth."""
    nodes, node = [], -1
    while tree.children(node):
        node = tree.children(node)[0]
        nodes.append(node)
    return nodes


@pytest.mark.parametrize("width", [1, 3])
def test_single_expert_equals_drafter(engine, mixed_ids, width):
    name = "prose"
    # Two fresh drafters over the same weights: their caches see the same batches, so they agree bit for bit.
    model = engine.drafters[name].runner.model
    drafter, twin = (Drafter(ModelRunner(model, name), name) for _ in range(2))
    fused = FusedDrafter({name: twin})
    prompts = [ids for d in mixed_ids for ids in mixed_ids[d][:2]]
    k = 5
    plain_ids = [f"single-{i}" for i in range(len(prompts))]
    try:
        # Two rounds each: the second extends the first by part of its draft and one other token, so row
        # alignment (keep the common prefix, roll back the rest) is exercised too.
        tokens = list(prompts)
        for _ in range(2):
            plain = drafter.draft([DraftRequest(s, t, k, width) for s, t in zip(plain_ids, tokens)])
            out = fused.draft([FusedRequest(s, t, k, [name], width) for s, t in zip(plain_ids, tokens)])
            for p, t in zip(plain_ids, tokens):
                a, b = plain[p], out[p].tree
                assert (a.tokens, a.parents, a.sources, a.confidences) == (b.tokens, b.parents, b.sources, b.confidences)
                assert out[p].votes[name] == [a.tokens[i] for i in _spine(a)]
            tokens = [t + [plain[p].tokens[i] for i in _spine(plain[p])[:2]] + [7] for p, t in zip(plain_ids, tokens)]
    finally:
        drafter.release(plain_ids)
        fused.release(plain_ids)
    assert not any(s in d.cached for d in (drafter, twin) for s in plain_ids)


def test_three_experts_make_valid_fused_trees(engine, mixed_ids):
    fused = FusedDrafter(engine.drafters)
    k = 4
    ids = [f"mix-{d}-{i}" for d in mixed_ids for i in range(len(mixed_ids[d]))]
    prompts = [p for d in mixed_ids for p in mixed_ids[d]]
    try:
        out = fused.draft([FusedRequest(s, p, k, EXPERTS) for s, p in zip(ids, prompts)])
    finally:
        fused.release(ids)
    assert set(out) == set(ids)
    spine_sources = set()
    siblings = 0
    for draft in out.values():
        tree = draft.tree
        assert all(p < i for i, p in enumerate(tree.parents)), "parents first"
        assert tree.depth == k
        spine = _spine(tree)
        assert len(spine) == k
        for d, node in enumerate(spine):
            spine_sources.add(tree.sources[node])
            # The spine is the most confident vote; every expert voted at every depth.
            best = max(draft.vote_confidence[e][d] for e in EXPERTS)
            assert tree.confidences[node] == pytest.approx(best)
            assert draft.votes[tree.sources[node]][d] == tree.tokens[node]
            # Alternatives are leaves with distinct tokens under the spine's parent.
            level = tree.children(tree.parents[node])
            assert len({tree.tokens[i] for i in level}) == len(level) <= len(EXPERTS)
            assert all(not tree.children(i) for i in level if i != node)
            siblings += len(level) - 1
        assert set(draft.votes) == set(EXPERTS) and all(len(v) == k for v in draft.votes.values())
    assert len(spine_sources) > 1, "on mixed-domain prompts more than one expert should lead somewhere"
    assert siblings > 0, "the experts should disagree somewhere"
    assert not any(s in d.cached for d in engine.drafters.values() for s in ids)


def test_unknown_expert_is_rejected(engine):
    with pytest.raises(ValueError):
        FusedDrafter(engine.drafters).draft([FusedRequest("x", [1, 2, 3], 2, ["nope"])])
    with pytest.raises(ValueError):
        FusedDrafter(engine.drafters).draft([FusedRequest("x", [1, 2, 3], 2, [])])


# -- the engine's fused path -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(zoo_engine, mixed_ids):
    """Target-only greedy outputs of the mixed prompts."""
    prompts = [p for d in mixed_ids for p in mixed_ids[d]]
    seqs = zoo_engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS), speculative=False)
    return prompts, [s.output_ids for s in seqs]


def _assert_lossless(engine, prompts, outputs, refs):
    ties, failures = greedy_divergences(engine.verifier.runner.model, prompts, outputs, refs)
    assert not failures, f"divergences that are not near-ties (prompt, position, gap): {failures}"
    assert len(ties) <= max(1, MAX_NEAR_TIE_SHARE * len(prompts)), ties  # 16-bit types round logits to ties


@pytest.mark.slow
@pytest.mark.parametrize("width", [1, 2])
def test_fused_greedy_equals_target_only(engine, reference, width):
    prompts, refs = reference
    engine.config = SpecConfig(k=4, tree_width=width)
    seqs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS), experts=EXPERTS)
    _assert_lossless(engine, prompts, [s.output_ids for s in seqs], refs)
    assert all(s.stats.drafts > 0 for s in seqs)
    used = set().union(*(s.stats.tokens_by_drafter for s in seqs))
    assert used <= set(EXPERTS) and len(used) > 1
    assert not engine._experts, "fused assignments are released with their sequences"


@pytest.mark.slow
def test_routed_greedy_equals_target_only(engine, reference):
    prompts, refs = reference
    seqs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS), experts=ROUTE)
    _assert_lossless(engine, prompts, [s.output_ids for s in seqs], refs)
    assert engine.steering.priors.stats, "routing feeds the prior table"
    assert all(s.stats.drafts > 0 for s in seqs)
    assert not engine._routers


def test_fused_sampling_runs(engine, mixed_ids):
    prompts = [mixed_ids[d][0] for d in mixed_ids]
    params = SamplingParams(max_new_tokens=8, temperature=0.8, seed=3)
    one = [s.output_ids for s in engine.generate(prompts, params, experts=EXPERTS)]
    two = [s.output_ids for s in engine.generate(prompts, params, speculative=False)]
    assert one == two  # one-hot acceptance emits the target's own keyed samples


def test_sampled_proposals_draft_alone_with_the_first_expert(engine, mixed_ids):
    engine.config = SpecConfig(k=3, proposal="sampled")
    prompts = [mixed_ids[d][0] for d in mixed_ids]
    seqs = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.8, seed=5), experts=["records", "code"])
    assert all(len(s.output_ids) > 0 for s in seqs)
    assert set().union(*(s.stats.tokens_by_drafter for s in seqs)) <= {"records"}


def test_unknown_experts_are_rejected(engine, mixed_ids):
    from cosine.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError):
        engine.generate([mixed_ids["code"][0]], SamplingParams(max_new_tokens=2), experts=["nope"])


@pytest.mark.slow
def test_fused_acceptance_not_below_single_drafters(engine, mixed_ids, capsys):
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    prompts = [p for d in mixed_ids for p in mixed_ids[d]]
    domains = [d for d in mixed_ids for _ in mixed_ids[d]]

    def per_domain(**kw) -> dict[str, float]:
        seqs = engine.generate(prompts, params, **kw)
        out: dict[str, list[float]] = {}
        for d, s in zip(domains, seqs):
            out.setdefault(d, []).append(s.stats.mean_acceptance_length)
        means = {d: sum(v) / len(v) for d, v in out.items()}
        means["all"] = sum(s.stats.mean_acceptance_length for s in seqs) / len(seqs)
        return means

    rows = {name: per_domain(drafter=name) for name in EXPERTS}
    rows["auto (best single)"] = per_domain(drafter="auto")
    rows["fused-3"] = per_domain(experts=EXPERTS)
    rows["routed"] = per_domain(experts=ROUTE)
    with capsys.disabled():
        cols = sorted(mixed_ids) + ["all"]
        print(f"\nmean acceptance length, k=4, {len(prompts)} prompts, {NEW_TOKENS} tokens")
        print(f"{'drafting':<20}" + "".join(f"{c:>9}" for c in cols))
        for name, row in rows.items():
            print(f"{name:<20}" + "".join(f"{row[c]:>9.3f}" for c in cols))
    for name in EXPERTS:
        assert rows["fused-3"]["all"] >= rows[name]["all"], (name, rows)


def test_prompt_tail_loss_names_the_prompts_domain(zoo_engine, zoo_prompts):
    """The cold-start prior: on the zoo's held-out prompts, the drafter with the lowest loss on a prompt's
    last TAIL_TOKENS tokens is that prompt's domain's for nearly all of them (97.5% of 120 when measured)."""
    from cosine.engine.prompt_scoring import TAIL_TOKENS, best_by_prompt_loss

    models = {name: d.runner.model for name, d in zoo_engine.drafters.items()}
    items = [(domain, zoo_engine.tokenizer.encode(text)) for domain, texts in zoo_prompts.items()
             for text in texts[:10]]
    assert any(len(ids) > TAIL_TOKENS for _, ids in items)  # the tail is a cut, not the whole prompt
    best = best_by_prompt_loss(models, [ids for _, ids in items])
    right = sum(b == domain for b, (domain, _) in zip(best, items))
    assert right >= 0.9 * len(items), list(zip(best, [d for d, _ in items]))
