"""Cost models (fit, persistence) and the verification batch scheduler."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from cosine.errors import InvalidParameterError
from cosine.policy.cost_model import CostModel, nnls
from cosine.policy.scheduling import (
    Candidate,
    SchedulerSettings,
    choose_batch,
    expected_tokens,
    hold_ms,
    objective,
)

TRUE = CostModel(
    verify_base_ms=6.0,
    verify_row_ms=0.8,
    verify_token_ms=0.35,
    verify_context_ms=0.002,
    draft_overhead_ms=0.3,
    draft_step_ms=0.6,
    draft_row_ms=0.12,
)


def verify_grid():
    return [(b, c, b * (1 + n)) for b in (1, 2, 4, 8, 16) for c in (32, 128, 384) for n in (0, 2, 4, 8)]


# -- cost model -----------------------------------------------------------------------------------------
def test_fit_recovers_known_coefficients():
    samples = [(b, c, t, TRUE.verify_ms(b, c, t)) for b, c, t in verify_grid()]
    model = CostModel().fit_verify(samples)
    for name, value in TRUE.verify_coefficients().items():
        assert getattr(model, name) == pytest.approx(value, rel=1e-6, abs=1e-9)
    drafts = [(b, s, TRUE.draft_ms(b, s)) for b in (1, 4, 16) for s in (1, 4, 8)]
    model.fit_draft(drafts)
    for name, value in TRUE.draft_coefficients().items():
        assert getattr(model, name) == pytest.approx(value, rel=1e-6, abs=1e-9)
    assert model.metadata["verify_samples"] == 60 and model.metadata["draft_samples"] == 9
    assert model.metadata["verify_fit"]["rms_ms"] < 1e-6


def test_fit_with_noise_stays_non_negative_and_close():
    rng = np.random.default_rng(0)
    truth = CostModel(verify_base_ms=6.0, verify_row_ms=0.0, verify_token_ms=0.35, verify_context_ms=0.002)
    samples = [(b, c, t, truth.verify_ms(b, c, t) * (1 + rng.normal(0, 0.03))) for b, c, t in verify_grid()]
    model = CostModel().fit_verify(samples)
    coef = model.verify_coefficients()
    assert all(v >= 0 for v in coef.values())
    assert coef["verify_row_ms"] < 0.3  # the zero coefficient is clipped, not driven negative
    assert coef["verify_token_ms"] == pytest.approx(0.35, rel=0.1)
    assert model.metadata["verify_fit"]["rms_relative"] < 0.05


def test_fit_finds_the_roofline_knee_of_a_big_target():
    """A pass that reads its weights whatever it feeds: flat up to about 100 tokens, then linear. The fit
    finds a knee near it (and the slope past it); a CPU-like target keeps no knee (the test above)."""
    def flat_then_linear(b, c, t):
        return 8.0 + max(21.9, 0.224 * t) + 5.1e-5 * b * c

    samples = [(b, c, t, flat_then_linear(b, c, t)) for b in (1, 2, 4, 8, 16, 32) for c in (64, 512, 2048)
               for t in {b * (1 + n) for n in (0, 2, 4, 8)}]
    model = CostModel().fit_verify(samples)
    assert 64 <= model.verify_free_tokens <= 140
    assert model.verify_token_ms == pytest.approx(0.224, rel=0.25)
    assert model.verify_ms(8, 512, 40) == pytest.approx(model.verify_ms(8, 512, 8), rel=0.02)  # under the knee
    assert CostModel.from_dict(model.to_dict()).verify_free_tokens == model.verify_free_tokens
    old = model.to_dict()
    del old["verify_ms"]["verify_free_tokens"]  # a model saved before the knee existed loads with none
    assert CostModel.from_dict(old).verify_free_tokens == 0.0
    assert TRUE.verify_free_tokens == 0.0 and CostModel().fit_verify(
        [(b, c, t, TRUE.verify_ms(b, c, t)) for b, c, t in verify_grid()]).verify_free_tokens == 0.0


def test_nnls_matches_the_constrained_optimum():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = np.array([2.0, -1.0, 1.0])  # unconstrained: x = (2.0, -1.0) roughly; constrained: x2 = 0
    x = nnls(a, b)
    assert x[1] == 0.0 and x[0] == pytest.approx(1.5)


def test_predictions_and_bad_arguments():
    m = TRUE
    assert m.verify_ms(0, 100, 0) == 0.0
    assert m.verify_ms(2, 100, 10) == pytest.approx(6.0 + 1.6 + 3.5 + 0.4)
    assert m.draft_ms(4, 0) == 0.0
    assert m.draft_ms(4, 3) == pytest.approx(0.3 + 3 * (0.6 + 0.48))
    with pytest.raises(InvalidParameterError):
        m.verify_ms(-1, 10, 1)
    with pytest.raises(InvalidParameterError):
        CostModel(verify_base_ms=-1.0)
    with pytest.raises(InvalidParameterError):
        CostModel().fit_verify([])
    with pytest.raises(InvalidParameterError):
        CostModel().fit_draft([(1, 2)])


def test_save_load_round_trip(tmp_path):
    model = CostModel().fit_verify([(b, c, t, TRUE.verify_ms(b, c, t)) for b, c, t in verify_grid()])
    model.metadata.update({"device": "cpu", "dtype": "float32", "target": "zoo/target", "created": "now"})
    path = tmp_path / "cost.json"
    model.save(path)
    again = CostModel.load(path)
    assert again == model
    assert again.metadata["verify_fit"] == model.metadata["verify_fit"]
    data = json.loads(path.read_text())
    assert data["format"] == "cosine.cost_model" and data["version"] == 1
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(InvalidParameterError):
        CostModel.load(path)
    path.write_text("not json")
    with pytest.raises(InvalidParameterError):
        CostModel.load(path)


def test_default_is_plausible():
    m = CostModel.default()
    assert 0 < m.verify_ms(1, 128, 1) < m.verify_ms(8, 128, 8) < m.verify_ms(8, 128, 72)
    assert 0 < m.draft_ms(1, 1) < m.verify_ms(1, 128, 1)
    assert 0 < m.draft_cost_ratio() < 1
    assert {"device", "dtype", "created", "source"} <= set(m.metadata)


# -- expected tokens ------------------------------------------------------------------------------------
def test_expected_tokens_formula():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens(0.8, 0) == 1.0
    assert expected_tokens(0.8, 3) == pytest.approx(1 + 0.8 + 0.64 + 0.512)
    with pytest.raises(InvalidParameterError):
        expected_tokens(1.5, 2)
    with pytest.raises(InvalidParameterError):
        expected_tokens(0.5, -1)


# -- scheduler ------------------------------------------------------------------------------------------
FLAT = CostModel(verify_base_ms=5.0, verify_token_ms=1.0)


def cand(rid, tokens=5, exp=3.0, **kw) -> Candidate:
    return Candidate(rid, tokens, exp, kw.pop("context", 50), **kw)


def test_empty_and_duplicates():
    assert choose_batch([], FLAT, SchedulerSettings()) == []
    with pytest.raises(InvalidParameterError):
        choose_batch([cand("a"), cand("a")], FLAT, SchedulerSettings())


def test_token_cap_is_honoured_and_one_always_fits():
    cands = [cand(f"r{i}", tokens=9, exp=4.0) for i in range(6)]
    for w in (0.0, 0.5, 1.0):
        settings = SchedulerSettings(latency_weight=w, token_cap=20)
        chosen = choose_batch(cands, FLAT, settings)
        assert 1 <= len(chosen) <= 2
        assert sum(9 for _ in chosen) <= 20
    big = [cand("huge", tokens=100, exp=10.0)]
    assert choose_batch(big, FLAT, SchedulerSettings(token_cap=20)) == ["huge"]


def test_max_batch_is_honoured():
    cands = [Candidate.plain(f"r{i}", 10) for i in range(10)]
    chosen = choose_batch(cands, FLAT, SchedulerSettings(latency_weight=0.0, max_batch=3))
    assert len(chosen) == 3


def test_priority_goes_first():
    cands = [cand("low1"), cand("high1", priority=1), cand("low2"), cand("high2", priority=1)]
    for w in (0.0, 1.0):
        chosen = choose_batch(cands, FLAT, SchedulerSettings(latency_weight=w, token_cap=10))
        assert sorted(chosen) == ["high1", "high2"]


def test_urgent_deadline_goes_first():
    cands = [
        cand("vip", priority=5),
        cand("late", tokens=9, exp=1.0, deadline_in_ms=50.0),
        cand("later", deadline_in_ms=150.0),
        cand("relaxed", deadline_in_ms=5000.0),
    ]
    chosen = choose_batch(cands, FLAT, SchedulerSettings(token_cap=9))
    assert chosen == ["late"]
    chosen = choose_batch(cands, FLAT, SchedulerSettings(token_cap=14))
    assert chosen[:2] == ["late", "later"]


def test_starving_candidate_is_not_left_behind():
    cost = CostModel(verify_base_ms=10.0, verify_token_ms=1.0, verify_context_ms=0.1)
    fast = [cand(f"f{i}", tokens=5, exp=4.0, context=10) for i in range(4)]
    slow = cand("long", tokens=1, exp=1.0, context=1000)
    settings = SchedulerSettings(latency_weight=0.0)
    assert "long" not in choose_batch(fast + [slow], cost, settings)
    slow.waited_ms = 600.0
    assert "long" in choose_batch(fast + [slow], cost, settings)


def test_latency_first_picks_smaller_faster_batches():
    cands = [cand(f"r{i}", tokens=9, exp=5.0) for i in range(8)]
    thr = choose_batch(cands, FLAT, SchedulerSettings(latency_weight=0.0, token_cap=1000))
    lat = choose_batch(cands, FLAT, SchedulerSettings(latency_weight=1.0, token_cap=1000))
    assert len(thr) == 8
    assert 1 <= len(lat) < len(thr)
    assert FLAT.verify_ms(len(lat), 50, 9 * len(lat)) < FLAT.verify_ms(len(thr), 50, 9 * len(thr))


def test_latency_first_splits_off_the_expensive_candidate():
    cands = [cand("small1", tokens=2, exp=1.5), cand("small2", tokens=2, exp=1.5), cand("big", tokens=60, exp=4.0)]
    thr = choose_batch(cands, FLAT, SchedulerSettings(latency_weight=0.0, token_cap=1000))
    lat = choose_batch(cands, FLAT, SchedulerSettings(latency_weight=1.0, token_cap=1000))
    assert "big" not in lat and sorted(lat) == ["small1", "small2"]
    assert len(thr) >= len(lat)


@pytest.mark.parametrize("padded", [False, True])
def test_no_single_addition_improves_the_chosen_batch(padded):
    rng = np.random.default_rng(3)
    cost = dataclasses.replace(CostModel.default(), padded=padded)
    for trial in range(20):
        cands = [
            Candidate(
                f"r{i}",
                int(rng.integers(1, 12)),
                float(rng.uniform(1, 5)),
                int(rng.integers(10, 600)),
                priority=0,
                waited_ms=float(rng.uniform(0, 300)),
                has_draft=bool(rng.random() > 0.2),
            )
            for i in range(12)
        ]
        settings = SchedulerSettings(latency_weight=float(rng.uniform(0, 1)), token_cap=60, max_batch=8)
        chosen = choose_batch(cands, cost, settings)
        assert len(chosen) == len(set(chosen)) >= 1

        def fed(rids, cands=cands):
            sizes = [c.tree_tokens for c in cands if c.rid in rids]
            return cost.fed(len(sizes), sum(sizes), max(sizes))

        assert fed(chosen) <= settings.token_cap or len(chosen) == 1
        assert len(chosen) <= settings.max_batch
        if len(chosen) == settings.max_batch:
            continue
        best = objective(chosen, cands, cost, settings)
        for c in cands:
            if c.rid not in chosen and fed(chosen + [c.rid]) <= settings.token_cap:
                assert objective(chosen + [c.rid], cands, cost, settings) <= best + 1e-9


def test_plain_candidates_are_cheap():
    c = Candidate("p", 7, 3.0, 100, has_draft=False)
    assert (c.tree_tokens, c.expected_tokens) == (1, 1.0)
    late = Candidate.plain("late", 100)
    drafted = [cand(f"d{i}", tokens=9, exp=4.0) for i in range(2)]
    packed = dataclasses.replace(CostModel.default(), padded=False)
    # With the CPU's large fixed cost per pass, a plain step rides along almost for free when tokens are packed.
    for w in (0.0, 0.5):
        chosen = choose_batch(drafted + [late], packed, SchedulerSettings(latency_weight=w, token_cap=19))
        assert sorted(chosen) == ["d0", "d1", "late"]
    # A full cap leaves no room for it beside the two drafts.
    chosen = choose_batch(drafted + [late], packed, SchedulerSettings(latency_weight=0.0, token_cap=18))
    assert sorted(chosen) == ["d0", "d1"]


def test_a_padded_pass_prices_every_row_at_its_largest_tree():
    padded = CostModel.default()
    assert padded.padded and padded.fed(3, 19, 9) == 27
    late = Candidate.plain("late", 100)
    drafted = [cand(f"d{i}", tokens=9, exp=4.0) for i in range(2)]
    # Beside 9-token trees a plain step computes 9 slots: the cap counts them (a big target's fixed cost
    # makes riding along worth it when it fits).
    big = CostModel(verify_base_ms=30.0, verify_token_ms=0.05, padded=True)
    for cap, want in ((26, ["d0", "d1"]), (27, ["d0", "d1", "late"])):
        assert sorted(choose_batch(drafted + [late], big, SchedulerSettings(latency_weight=0.5, token_cap=cap))) == want
    # On the CPU zoo its 9 slots cost 3.3 ms, a pass of its own 7.7: even throughput first, it rides along.
    assert padded.verify_ms(3, 100, 27) < padded.verify_ms(2, 100, 18) + padded.verify_ms(1, 100, 1)
    assert sorted(choose_batch(drafted + [late], padded, SchedulerSettings(latency_weight=0.0))) == ["d0", "d1", "late"]
    # Throughput first, one deep tree would pad a pass of many plain steps to its size: they go apart.
    plain = [Candidate.plain(f"p{i}", 100) for i in range(16)]
    deep = cand("deep", tokens=17, exp=2.0)
    chosen = choose_batch(plain + [deep], padded, SchedulerSettings(latency_weight=0.0, token_cap=1000))
    assert chosen == ["deep"] or (len(chosen) == 16 and "deep" not in chosen)
    packed = dataclasses.replace(padded, padded=False)
    assert len(choose_batch(plain + [deep], packed, SchedulerSettings(latency_weight=0.0, token_cap=1000))) == 17


@pytest.mark.parametrize("padded", [False, True])
def test_throughput_first_never_splits_into_a_longer_makespan(padded):
    """Left out, a candidate still needs a pass: throughput first, the chosen pass plus one for the rest
    never take longer than one pass for everyone (when everyone fits in one)."""
    rng = np.random.default_rng(5)
    cost = dataclasses.replace(CostModel.default(), padded=padded)
    settings = SchedulerSettings(latency_weight=0.0, token_cap=10_000, max_batch=64)
    for trial in range(30):
        cands = [
            Candidate(f"r{i}", int(rng.integers(1, 12)), float(rng.uniform(1, 5)), int(rng.integers(10, 600)),
                      has_draft=bool(rng.random() > 0.3))
            for i in range(int(rng.integers(2, 16)))
        ]
        chosen = set(choose_batch(cands, cost, settings))

        def v(group):
            if not group:
                return 0.0
            sizes = [c.tree_tokens for c in group]
            fed = cost.fed(len(sizes), sum(sizes), max(sizes))
            return cost.verify_ms(len(group), max(c.context for c in group), fed)

        split = v([c for c in cands if c.rid in chosen]) + v([c for c in cands if c.rid not in chosen])
        assert split <= v(cands) + 1e-9


def test_settings_are_validated():
    with pytest.raises(InvalidParameterError) as err:
        SchedulerSettings(latency_weight=1.5)
    assert err.value.field == "latency_weight"
    with pytest.raises(InvalidParameterError):
        SchedulerSettings(token_cap=0)
    with pytest.raises(InvalidParameterError):
        SchedulerSettings(max_batch=0)
    with pytest.raises(InvalidParameterError):
        Candidate("x", 0, 1.0, 10)
    with pytest.raises(InvalidParameterError):
        Candidate("x", 2, 1.0, 10, waited_ms=-1.0)


def test_hold_for_coming_drafts_only_when_the_pass_barely_grows():
    ready = [Candidate(f"r{i}", 5, 3.0, 100) for i in range(4)]
    coming = [(Candidate(f"c{i}", 5, 3.0, 100), 5.0) for i in range(4)]
    flat = CostModel(verify_base_ms=30.0, verify_token_ms=0.01)  # a big target: the batch is almost free
    steep = CostModel(verify_base_ms=1.0, verify_token_ms=1.0)  # a small one: every token costs
    assert hold_ms(ready, coming, flat) == 5.0
    assert hold_ms(ready, coming, steep) == 0.0
    assert hold_ms(ready, [(c, 80.0) for c, _ in coming], flat) == 0.0  # past max_hold_ms
    assert hold_ms([], coming, flat) == 0.0
    urgent = [Candidate("u", 5, 3.0, 100, deadline_in_ms=10.0)]
    assert hold_ms(urgent, coming, flat) == 0.0
    assert hold_ms(ready, coming, flat, SchedulerSettings(max_batch=4)) == 0.0


def test_a_cpu_pass_waits_only_for_drafts_due_within_a_fixed_cost():
    cpu = CostModel.default()  # 7.3 ms a pass + 0.37 ms a slot
    ready = [Candidate.plain("p", 100)]
    coming = [(Candidate(f"c{i}", 5, 3.0, 100), 20.0) for i in range(3)]
    # Going now, the three drafts go in the next pass, done by 20 + V(3 x 5 slots); held, by 20 + V(4 x 5).
    assert hold_ms(ready, coming, cpu) == 0.0
    # Due in 2 ms: holding saves the second pass's fixed cost (7.3 ms) for 2 ms idle.
    assert hold_ms(ready, [(c, 2.0) for c, _ in coming], cpu) == 2.0
