"""The measured round corrections (pass scale, per-round overhead) and what they do to speculation length."""

from __future__ import annotations

import pytest

from cosine.errors import InvalidParameterError
from cosine.policy.round_clock import ClockSettings, RoundClock
from cosine.policy.speculation import SpecSettings, SpeculationController
from cosine.service.steering import Steering, Switches
from tests.test_steering import PADDED_CPU, decision, round_ks, steered


def test_the_clock_is_neutral_until_it_has_seen_enough_passes_then_tracks_them():
    clock = RoundClock(ClockSettings(ewma=0.5, min_passes=2))
    clock.observe(30.0, 20.0, 4, [40.0])
    assert (clock.pass_scale, clock.overhead_ms(4)) == (1.0, 0.0)  # one pass: the cost model alone
    assert clock.round_ms(10.0, 2.0, 4) == 12.0
    clock.observe(20.0, 20.0, 4, [20.0, 40.0])
    assert clock.pass_scale == pytest.approx(1.25)  # (1.5 + 1.0) / 2
    # Both passes had 4 rows: a level, (0.5 * 40 + 30) / 1.5, whatever the batch.
    assert clock.overhead_ms(4) == clock.overhead_ms(16) == pytest.approx(100 / 3)
    assert clock.round_ms(10.0, 2.0, 4) == pytest.approx(12.5 + 2.0 + 100 / 3)
    assert clock.as_dict() == {"pass_scale": 1.25, "round_overhead_base_ms": 33.33, "round_overhead_row_ms": 0.0}


def test_the_overhead_is_fitted_as_a_line_in_the_batch():
    clock = RoundClock(ClockSettings(ewma=0.05, min_passes=0))
    for batch in [1, 4, 8, 16, 24] * 20:
        clock.observe(10.0, 10.0, batch, [5.0 + 2.0 * batch + d for d in (-1.0, 1.0)])
    assert clock.overhead_ms(0) == pytest.approx(5.0)
    assert clock.overhead_ms(20) == pytest.approx(45.0)
    # Work that only shrinks as the batch grows is not extrapolated below zero per row: a level.
    level = RoundClock(ClockSettings(ewma=0.05, min_passes=0))
    for batch in [1, 8, 16] * 20:
        level.observe(10.0, 10.0, batch, [30.0 - batch])
    assert level.overhead_ms(100) == level.overhead_ms(1) > 0
    # A line that would cross zero above no batch goes through the origin instead.
    steep = RoundClock(ClockSettings(ewma=0.05, min_passes=0))
    for batch in [2, 4] * 20:
        steep.observe(10.0, 10.0, batch, [10.0 * batch - 15.0])
    assert steep.overhead_ms(0) == 0.0 and 0 < steep.overhead_ms(4) < 25.0


def test_the_clock_keeps_its_estimates_bounded_and_skips_what_it_cannot_use():
    clock = RoundClock(ClockSettings(ewma=1.0, min_passes=0, scale_bounds=(0.5, 2.0), max_overhead_ms=100.0))
    clock.observe(100.0, 1.0, 2, [-50.0, -10.0])  # lookahead hits can make a round cheaper than its model
    assert (clock.pass_scale, clock.overhead_ms(2)) == (2.0, 0.0)
    clock.observe(0.0, 10.0, 2, [5000.0])  # a pass that measured nothing leaves the scale alone
    assert (clock.pass_scale, clock.overhead_ms(2)) == (2.0, 100.0)
    clock.observe(10.0, 10.0, 2, [])  # no request had a round to time: the overhead stays
    assert (clock.pass_scale, clock.overhead_ms(2)) == (1.0, 100.0)
    with pytest.raises(InvalidParameterError):
        clock.observe(float("nan"), 1.0, 2, [])
    with pytest.raises(InvalidParameterError):
        ClockSettings(ewma=0.0)
    with pytest.raises(InvalidParameterError):
        ClockSettings(scale_bounds=(1.5, 2.0))


def test_a_fixed_cost_per_round_lengthens_drafts_and_lowers_the_off_switch():
    ctl = SpeculationController(SpecSettings(draft_cost_ratio=0.2))
    bare = [ctl.best_k(a, 0, 8, verify_cost=0.2) for a in (0.6, 0.75, 0.9)]
    dear = [ctl.best_k(a, 0, 8, verify_cost=0.2, round_cost=2.0) for a in (0.6, 0.75, 0.9)]
    assert all(d > b for d, b in zip(dear, bare))
    assert ctl.off_threshold(verify_cost=0.2) == pytest.approx(0.4)
    assert ctl.off_threshold(verify_cost=0.2, round_cost=1.0) == pytest.approx(0.2)
    assert ctl.best_k(0.3, 0, 8, verify_cost=0.2) == 0 < ctl.best_k(0.3, 0, 8, verify_cost=0.2, round_cost=1.0)
    with pytest.raises(InvalidParameterError):
        ctl.best_k(0.5, 0, 8, round_cost=-1.0)


def test_steering_learns_the_overhead_from_timed_rounds_and_drafts_longer_for_it():
    s = Steering(Switches(), k=4, cost=PADDED_CPU)
    s.control = decision()
    s.batch, s.context = 8, 100
    steers = {f"r{i}": steered(s, [(4, 3)] * 8) for i in range(8)}
    before = round_ks(s, steers)
    # Passes that took what the model says, rounds spending 40 ms outside forwards beyond modelled drafting.
    for _ in range(40):
        modelled = PADDED_CPU.verify_ms(8, 100, 8 * 5)
        s.observe_pass(modelled, 8, 100, [5] * 8, [(40.0 + PADDED_CPU.draft_ms(8, 4), 4)] * 8)
    assert s.clock.pass_scale == pytest.approx(1.0)
    assert s.clock.overhead_ms(8) == pytest.approx(40.0)
    assert s.round_cost() == pytest.approx(40.0 / PADDED_CPU.verify_ms(8, 100, 8))
    after = round_ks(s, steers)
    assert len(set(after.values())) == 1 and max(after.values()) > max(before.values())
