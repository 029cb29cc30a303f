"""Which outcomes a drafter bets on while its draft is verified (cosine.policy.bets, pure)."""

from __future__ import annotations

from cosine.policy.bets import Outcome, choose, outcomes


def test_outcomes_are_ranked_by_the_drafters_own_probabilities():
    # Spine 10, 11, 12 with confidences .9, .5, .6; runners-up 20 (.05), 21 (.4) and 22 (.1), none at depth 3.
    found = outcomes([10, 11, 12], [0.9, 0.5, 0.6], [[(20, 0.05)], [(21, 0.4), (22, 0.1)], []])
    assert [(o.depth, o.assumed) for o in found] == [(2, (10, 21)), (0, (10, 11, 12)), (2, (10, 22)), (1, (20,))]
    assert abs(found[0].likelihood - 0.9 * 0.4) < 1e-12  # reach depth 2 (.9), then the runner-up (.4)
    assert abs(found[1].likelihood - 0.9 * 0.5 * 0.6) < 1e-12


def test_the_whole_draft_is_always_bet_on_and_other_rows_go_to_the_likeliest_outcomes():
    a = [Outcome(0, (1, 2), 0.1), Outcome(1, (5,), 0.6), Outcome(2, (1, 6), 0.2)]
    b = [Outcome(0, (3,), 0.9), Outcome(1, (7,), 0.05)]
    assert choose({"a": a, "b": b}, rows=3) == {"a": [a[0], a[1]], "b": [b[0]]}
    assert choose({"a": a, "b": b}, rows=1) == {"a": [a[0]], "b": [b[0]]}, "one row each at least"
    assert choose({"a": a, "b": b}, rows=9) == {"a": [a[0], a[1], a[2]], "b": [b[0], b[1]]}

