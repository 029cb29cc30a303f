"""Adaptive speculation length: estimate, warm-up, hysteresis, pressure, bounds, modes, the token cap."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from cosine.errors import InvalidParameterError
from cosine.policy.scheduling import expected_tokens
from cosine.policy.speculation import RequestSpec, SpecSettings, SpeculationController, cap_total, round_depth


def simulate(ctl: SpeculationController, alpha: float, rounds: int, seed: int = 0, **kw) -> list[int]:
    """Drive one request with i.i.d. acceptance ``alpha``; returns the k chosen each round."""
    state = ctl.new_request()
    rng = random.Random(seed)
    ks = []
    for _ in range(rounds):
        k = ctl.k_for(state, **kw)
        ks.append(k)
        accepted = 0
        while accepted < k and rng.random() < alpha:
            accepted += 1
        state.observe(k, accepted)
    return ks


def settled(alpha: float, **settings) -> tuple[SpeculationController, RequestSpec]:
    """A request past warm-up whose estimate sits at ``alpha`` (a prior too heavy for two rounds to move)."""
    ctl = SpeculationController(SpecSettings(**settings))
    state = RequestSpec(replace(ctl.settings, prior_trials=1e9), prior=alpha)
    for _ in range(ctl.settings.warmup_rounds):
        state.observe(1, 1)
    assert state.acceptance_rate == pytest.approx(alpha, abs=1e-6)
    return ctl, state


def test_estimate_follows_observations():
    state = RequestSpec(SpecSettings(prior_acceptance=0.6))
    assert state.acceptance_rate == pytest.approx(0.6)
    for _ in range(30):
        state.observe(4, 4)
    assert state.acceptance_rate > 0.95
    for _ in range(30):
        state.observe(4, 0)
    assert state.acceptance_rate < 0.1
    state.observe(0, 0)  # no draft: nothing learnt
    assert state.rounds == 60 and state.drafted == 240 and state.accepted == 120
    with pytest.raises(InvalidParameterError):
        state.observe(2, 3)
    with pytest.raises(InvalidParameterError):
        state.observe(-1, 0)


def test_estimate_counts_only_tested_positions():
    # A chain is rejected at its first wrong token: 1 accepted of 4 drafted tests 2 positions, not 4.
    state = RequestSpec(SpecSettings(prior_trials=1e-9))
    state.observe(4, 1)
    assert state.acceptance_rate == pytest.approx(0.5)


def test_warm_up_uses_k_init():
    ctl = SpeculationController(SpecSettings(k_init=4, warmup_rounds=2))
    state = ctl.new_request()
    assert ctl.k_for(state) == 4
    state.observe(4, 0)
    assert ctl.k_for(state) == 4
    state.observe(4, 0)
    for _ in range(5):
        state.observe(4, 0)
    assert ctl.k_for(state) < 4  # warm-up over, bad acceptance: shorter


def test_k_is_zero_for_very_low_acceptance():
    ks = simulate(SpeculationController(), alpha=0.02, rounds=60)
    assert ks[:2] == [4, 4]
    assert ks[-20:].count(0) >= 15  # off, apart from the occasional probe round
    ctl, state = settled(0.05)
    assert ctl.k_for(state) == 0


def test_off_threshold_is_computed_from_the_cost_ratio():
    ctl = SpeculationController(SpecSettings(draft_cost_ratio=0.25, hysteresis=0.0))
    assert ctl.off_threshold() == pytest.approx(0.25)
    assert ctl.off_threshold(pressure=1.0) == pytest.approx(0.5)
    assert ctl.best_k(0.24, 0, 8) == 0
    assert ctl.best_k(0.26, 0, 8) >= 1
    explicit = SpeculationController(SpecSettings(off_below=0.5))
    assert explicit.off_threshold() == 0.5 and explicit.best_k(0.45, 0, 8) == 0


def test_k_grows_with_acceptance():
    ks = []
    for alpha in (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.97):
        ctl, state = settled(alpha, hysteresis=0.0)
        ks.append(ctl.k_for(state))
    assert ks == sorted(ks)
    assert ks[0] == 0 and ks[-1] == 8 and len(set(ks)) >= 4


def test_hysteresis_prevents_flapping():
    for alpha in (0.6, 0.8):
        for seed in range(3):
            jumpy = simulate(SpeculationController(SpecSettings(hysteresis=0.0)), alpha, 200, seed)
            steady = simulate(SpeculationController(SpecSettings(hysteresis=0.1)), alpha, 200, seed)
            changes = lambda ks: sum(a != b for a, b in zip(ks, ks[1:]))  # noqa: E731
            assert changes(steady) * 4 < changes(jumpy)
    # A small move of the estimate does not change k; a large one does.
    ctl = SpeculationController(SpecSettings(hysteresis=0.1))
    state = ctl.new_request(prior=0.8)
    state.observe(4, 4)
    state.observe(4, 2)
    k = ctl.k_for(state)
    assert k == 4
    state.observe(4, 2)  # the estimate dips a little
    assert ctl.k_for(state) == k
    for _ in range(6):  # and then a lot
        state.observe(4, 0)
    assert ctl.k_for(state) < k


def test_pressure_shortens_and_an_idle_verifier_changes_nothing():
    ctl, state = settled(0.7, hysteresis=0.0)
    neutral = ctl.best_k(state.acceptance_rate, 0, 8)
    assert ctl.best_k(state.acceptance_rate, 0, 8, pressure=1.0) < neutral
    # An idle verifier waits for drafts: drafting's time stays on the round's path, so k stays the optimum
    # at the true cost (the controller's bounds are what lengthen drafts then).
    assert ctl.best_k(state.acceptance_rate, 0, 8, pressure=-0.5) == neutral
    assert ctl.k_for(state, pressure=-1.0) == neutral < 8
    assert ctl.cost_ratio(-1.0) == ctl.cost_ratio(0.0) < ctl.cost_ratio(0.5)
    assert ctl.k_for(state, pressure=1.0) < neutral
    # Pressure also moves the off switch: a marginal request stops drafting under load.
    ctl, state = settled(0.3, hysteresis=0.0)
    assert ctl.k_for(state) >= 1 and ctl.k_for(state, pressure=1.0) == 0


def test_bounds_override_settings():
    ctl, low = settled(0.05)
    assert ctl.k_for(low, bounds=(2, 3)) == 2
    ctl, high = settled(0.97)
    assert ctl.k_for(high, bounds=(2, 3)) == 3
    assert ctl.k_for(high, bounds=(0, 0)) == 0
    ctl, high = settled(0.97, hysteresis=0.0)
    assert ctl.k_for(high, bounds=(10, 12)) == 12  # beyond k_max: the controller's bounds win
    fresh = SpeculationController(SpecSettings(k_init=4)).new_request()
    assert SpeculationController(SpecSettings(k_init=4)).k_for(fresh, bounds=(0, 2)) == 2  # warm-up clamped
    with pytest.raises(InvalidParameterError):
        ctl.k_for(high, bounds=(3, 2))


def test_off_and_fixed_modes():
    ctl, state = settled(0.97)
    assert ctl.k_for(state, mode="off") == 0
    assert ctl.k_for(state, mode="fixed", fixed_k=3) == 3
    assert ctl.k_for(state, mode="fixed", fixed_k=3, bounds=(5, 6), pressure=1.0) == 3
    assert ctl.k_for(state, mode="fixed") == ctl.settings.k_init
    with pytest.raises(InvalidParameterError):
        ctl.k_for(state, mode="turbo")
    with pytest.raises(InvalidParameterError):
        ctl.k_for(state, mode="fixed", fixed_k=-1)


def rejected(**settings) -> tuple[SpeculationController, RequestSpec]:
    """A request whose first ten drafts were rejected outright (its estimate says: switch off)."""
    ctl = SpeculationController(SpecSettings(**settings))
    state = ctl.new_request()
    for _ in range(10):
        state.observe(4, 0)
    return ctl, state


def test_switched_off_requests_probe_and_recover():
    ctl, state = rejected(probe_every=5, probe_first=5)
    ks = [ctl.k_for(state) for _ in range(10)]
    assert ks.count(0) == 8 and ks[4] > 0 and ks[9] > 0
    for _ in range(4):  # the drafter got good (e.g. the text turned predictable)
        state.observe(ks[9], ks[9])
    assert ctl.k_for(state) > 0


def test_probes_back_off_from_the_first_gap_to_probe_every():
    ctl, state = rejected(probe_first=2, probe_every=16)
    ks = [ctl.k_for(state) for _ in range(62)]
    probes = [i + 1 for i, k in enumerate(ks) if k > 0]  # decisions since going off, 1-based
    assert probes == [2, 6, 14, 30, 46, 62]  # gaps 2, 4, 8, 16, then 16 for good
    state.observe(4, 4)  # a probe that was all accepted turns it back on ...
    state.observe(4, 4)
    assert ctl.k_for(state) > 0 and state.probe_gap == 0  # ... and the next time it goes off starts at 2 again


def test_balance_is_bounded_smooth_and_monotone():
    ctl = SpeculationController()
    assert ctl.balance(0.8, 0, 0) == pytest.approx(0.0)
    assert ctl.balance(0.0, 0, 0) < -0.8  # idle verifier: lengthen
    assert ctl.balance(1.0, 0, 20) > 0.9  # saturated with drafts piling up: shorten
    values = [ctl.balance(0.9, 0, n) for n in range(0, 64)]
    assert all(-1 <= v <= 1 for v in values)
    assert values == sorted(values)
    busy = [ctl.balance(b / 100, 0, 0) for b in range(101)]
    assert busy == sorted(busy)
    assert max(abs(a - b) for a, b in zip(busy, busy[1:])) < 0.1  # no jumps
    assert ctl.balance(1.7, 0, 0) == ctl.balance(1.0, 0, 0)  # utilisation is clamped
    with pytest.raises(InvalidParameterError):
        ctl.balance(0.5, -1, 0)


def test_cap_total_shortens_the_longest_first():
    ks = {"a": 8, "b": 4, "c": 2}
    assert cap_total(ks, None, 100) == ks
    out = cap_total(ks, None, 13)  # 3 roots + 14 drafts = 17: four steps off the longest
    assert out == {"a": 4, "b": 4, "c": 2}
    assert sum(1 + k for k in out.values()) == 13
    out = cap_total(ks, None, 10)
    assert sum(1 + k for k in out.values()) <= 10 and out["c"] == 2 and abs(out["a"] - out["b"]) <= 1
    assert ks == {"a": 8, "b": 4, "c": 2}  # the input is not modified


def test_cap_total_counts_tree_width_and_never_goes_negative():
    out = cap_total({"chain": 4, "tree": 2}, {"tree": 3}, 9)  # 2 + 4 + 6 = 12 > 9: the tree has more candidates
    assert out == {"chain": 4, "tree": 1}
    assert cap_total({"a": 3, "b": 3, "c": 3}, None, 2) == {"a": 0, "b": 0, "c": 0}
    with pytest.raises(InvalidParameterError):
        cap_total({"a": -1}, None, 10)
    with pytest.raises(InvalidParameterError):
        cap_total({"a": 1}, {"a": 0}, 10)
    assert SpeculationController.cap_total({"a": 5}, None, 3) == {"a": 2}


def test_cap_total_padded_counts_every_row_at_the_largest_draft():
    ks = {"a": 8, "b": 2, "c": 2}
    assert cap_total(ks, None, 27, padded=True) == ks  # 3 rows x 9 slots
    out = cap_total(ks, None, 15, padded=True)  # 3 x (1 + 4): only the longest is shortened
    assert out == {"a": 4, "b": 2, "c": 2}
    assert cap_total(ks, None, 15) == ks  # packed: 3 + 12 = 15 fits
    assert cap_total(ks, None, 2, padded=True) == {"a": 0, "b": 0, "c": 0}


def test_round_depth_of_alike_requests_maximises_the_rounds_tokens_per_ms():
    # A pass of 4 padded rows: 10 ms + 0.5 ms per slot, no drafting cost.
    def ms(depth):
        return 10.0 + 0.5 * 4 * (1 + depth)

    rates = {"a": 0.9, "b": 0.9, "c": 0.9, "d": 0.9}
    good = round_depth(rates, {}, 0, 8, ms)
    poor = round_depth({rid: 0.2 for rid in rates}, {}, 0, 8, ms)
    assert good > poor and poor <= 1
    def rate(depth):
        return sum(expected_tokens(x, depth) for x in rates.values()) / ms(depth)

    assert all(rate(good) >= rate(d) for d in range(9))
    # Bounds hold, limits cap each request's draft, fixed requests' tokens count.
    assert round_depth(rates, {}, 0, 2, ms) == 2
    assert round_depth({rid: 0.05 for rid in rates}, {}, 1, 8, ms) == 1
    assert round_depth(rates, {rid: 1 for rid in rates}, 0, 8, ms) <= 1  # past the limits: only cost
    assert round_depth(rates, {rid: 0 for rid in rates}, 0, 8, ms) == 0  # no room: drafting adds only cost
    with pytest.raises(InvalidParameterError):
        round_depth(rates, {}, 3, 2, ms)
    with pytest.raises(InvalidParameterError):
        round_depth({"a": 1.5}, {}, 0, 2, ms)
    assert SpeculationController.round_depth(rates, {}, 0, 8, ms) == good


def test_round_depth_minimises_the_rounds_mean_per_token_latency():
    """Requests that accept unlike: the depth serves the round's mean per-token latency, which weighs the
    poorly accepting requests (the latency tail) more than the round's tokens per ms would."""
    def ms(depth):
        return 10.0 + 0.5 * 4 * (1 + depth)

    rates = {"good": 0.98, "a": 0.5, "b": 0.5, "c": 0.5}
    depth = round_depth(rates, {}, 0, 8, ms)

    def latency(k):
        return ms(k) * sum(1 / expected_tokens(x, k) for x in rates.values()) / len(rates)

    def per_ms(k):
        return sum(expected_tokens(x, k) for x in rates.values()) / ms(k)

    assert all(latency(depth) <= latency(k) for k in range(9))
    most_tokens = max(range(9), key=per_ms)
    assert depth < most_tokens
    # A request of fixed length counts as one token a round, whatever the depth: it weighs towards short rounds.
    assert round_depth({"a": 0.8}, {}, 0, 8, ms, others=3) <= round_depth({"a": 0.8}, {}, 0, 8, ms)
    with pytest.raises(InvalidParameterError):
        round_depth(rates, {}, 0, 2, ms, others=-1)


def test_default_hysteresis_does_not_pin_k_at_k_init():
    # U is flat near its optimum: with a coarse hysteresis a request kept k_init (4) for good even when
    # its acceptance called for much longer drafts; the default lets it move, and still not flap.
    ctl = SpeculationController(SpecSettings(draft_cost_ratio=0.05))
    assert ctl.utility(0.75, 7) < 1.06 * ctl.utility(0.75, 4)  # the flatness
    for alpha in (0.75, 0.85):
        ks = simulate(ctl, alpha, 60, seed=1)
        assert max(ks[20:]) > 4 and sum(ks[20:]) / 40 > 5
    changes = lambda ks: sum(a != b for a, b in zip(ks, ks[1:]))  # noqa: E731
    jumpy = simulate(SpeculationController(SpecSettings(hysteresis=0.0)), 0.7, 200, 0)
    steady = simulate(SpeculationController(SpecSettings()), 0.7, 200, 0)
    assert changes(steady) < changes(jumpy)


def test_align_lengthens_short_drafts_when_the_pass_barely_grows():
    ctl = SpeculationController()
    ks = {"a": 7, "b": 4, "c": 5, "off": 0, "other": 3}
    rates = {"a": 0.85, "b": 0.6, "c": 0.7, "off": 0.05}  # "other": no estimate (not adaptive): left alone
    # A large target on a GPU: a fed token adds 0.08 ms to a ~45 ms round.
    out = ctl.align(ks, rates, token_ms=0.08, round_ms=45.0)
    assert out == {"a": 7, "b": 7, "c": 7, "off": 0, "other": 3}
    assert ks["b"] == 4  # the input is not modified
    # A request's own limit (its room) holds; widths count per candidate.
    assert ctl.align(ks, rates, 0.08, 45.0, limits={"b": 5})["b"] == 5
    # An idle verifier (pressure -1) makes no token cheaper: dear tokens are not added; nothing ever goes
    # past the longest draft.
    out = ctl.align(ks, rates, token_ms=10.0, round_ms=45.0, pressure=-1.0)
    assert out == ctl.align(ks, rates, token_ms=10.0, round_ms=45.0) and out["b"] == 4
    assert max(ctl.align(ks, rates, 0.0, 45.0).values()) == 7
    # Nothing to align: all equal, or nothing drafted.
    assert ctl.align({"a": 4, "b": 4}, {"a": 0.5, "b": 0.9}, 0.08, 45.0) == {"a": 4, "b": 4}
    assert ctl.align({"a": 0, "b": 0}, {"a": 0.5, "b": 0.9}, 0.08, 45.0) == {"a": 0, "b": 0}


def test_align_keeps_short_drafts_when_every_token_costs():
    ctl = SpeculationController()
    ks = {"a": 7, "b": 2, "c": 5}
    rates = {"a": 0.85, "b": 0.3, "c": 0.7}
    # A small target on a CPU: a fed token adds 0.37 ms to a ~20 ms round; a poor request stays short.
    out = ctl.align(ks, rates, token_ms=0.37, round_ms=20.0)
    assert out["b"] == 2 and out["a"] == 7
    # Pressure makes every added token dearer: never more lengthening than without it.
    cheap = ctl.align(ks, rates, token_ms=0.1, round_ms=30.0)
    dear = ctl.align(ks, rates, token_ms=0.1, round_ms=30.0, pressure=1.0)
    assert all(ks[r] <= dear[r] <= cheap[r] for r in ks)
    # Lengthening stops at the longest k whose added tokens still pay (partial alignment).
    out = ctl.align({"a": 8, "b": 2}, {"a": 0.9, "b": 0.6}, token_ms=0.5, round_ms=30.0)
    assert 2 < out["b"] < 8
    with pytest.raises(InvalidParameterError):
        ctl.align({"a": 2}, {"a": 1.5}, 0.1, 30.0)
    with pytest.raises(InvalidParameterError):
        ctl.align({"a": 2}, {"a": 0.5}, -0.1, 30.0)


def test_settings_are_validated():
    with pytest.raises(InvalidParameterError) as err:
        SpecSettings(k_init=9)
    assert err.value.field == "k_init"
    with pytest.raises(InvalidParameterError):
        SpecSettings(k_min=5, k_max=3)
    with pytest.raises(InvalidParameterError):
        SpecSettings(ewma=0.0)
    with pytest.raises(InvalidParameterError):
        SpecSettings(off_below=1.5)
    with pytest.raises(InvalidParameterError):
        SpecSettings(hysteresis=-0.1)


def test_a_drafted_tokens_share_of_the_pass_shortens_drafts_and_raises_the_off_switch():
    ctl = SpeculationController(SpecSettings(draft_cost_ratio=0.05))
    free = [ctl.best_k(a, 0, 8) for a in (0.5, 0.75, 0.9)]
    dear = [ctl.best_k(a, 0, 8, verify_cost=0.3) for a in (0.5, 0.75, 0.9)]
    assert all(d < f for d, f in zip(dear, free)) and dear[1] == 2
    assert ctl.off_threshold(verify_cost=0.3) == pytest.approx(0.35)
    assert ctl.best_k(0.3, 0, 8, verify_cost=0.3) == 0 < ctl.best_k(0.3, 0, 8)
    with pytest.raises(InvalidParameterError):
        ctl.best_k(0.5, 0, 8, verify_cost=-1)


def test_drafting_is_priced_by_its_share_on_the_rounds_path():
    ctl = SpeculationController(SpecSettings(draft_cost_ratio=0.2))
    assert ctl.cost_ratio(0.5, draft_share=0.25) == pytest.approx(0.25 * ctl.cost_ratio(0.5))
    assert ctl.off_threshold(draft_share=0.0) == 0.0  # nothing on the path: any acceptance pays
    for rate in (0.5, 0.75, 0.9):
        assert ctl.best_k(rate, 0, 8, draft_share=0.1) >= ctl.best_k(rate, 0, 8)
    assert ctl.best_k(0.75, 0, 8, draft_share=0.1) > ctl.best_k(0.75, 0, 8)
    with pytest.raises(InvalidParameterError):
        ctl.best_k(0.5, 0, 8, draft_share=1.5)
