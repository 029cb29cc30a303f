"""Expertise routing: scores, explore/exploit, UCB, cooperation, restrictions, the online prior table,
and the agreement/confidence feedback the engine computes for it."""

from __future__ import annotations

import json

import pytest

from cosine.policy.routing import (
    PriorTable,
    RequestRouter,
    RoundFeedback,
    RoutingSettings,
    agreement,
    harmonic,
    length_to_score,
    mean_confidence,
    round_feedback,
    solo_acceptance,
)

NAMES = ["code", "prose", "records"]


def feedback(acceptance: float, **scores: float) -> RoundFeedback:
    """A round where each named drafter had confidence = agreement = its score."""
    return RoundFeedback(confidence=dict(scores), agreement=dict(scores), acceptance_length=acceptance)


def test_harmonic():
    assert harmonic(0.0, 0.9) == 0.0
    assert harmonic(0.9, 0.0) == 0.0
    assert harmonic(1.0, 1.0) == pytest.approx(1.0)
    assert harmonic(0.5, 1.0) == pytest.approx(2 / 3)
    assert harmonic(0.2, 0.8) < (0.2 + 0.8) / 2  # punishes the weak side more than the mean does


def test_length_to_score_is_monotone_in_0_1():
    values = [length_to_score(x) for x in (0.5, 1.0, 2.0, 3.0, 5.0)]
    assert values[:2] == [0.0, 0.0]
    assert values == sorted(values) and values[-1] < 1.0
    assert length_to_score(2.0) == pytest.approx(0.5)


def test_ema_of_harmonic_score():
    router = RequestRouter(NAMES, RoutingSettings(smoothing=0.5))
    router.observe(RoundFeedback({"code": 0.8}, {"code": 0.8}, 3.0))
    assert router.score("code") == pytest.approx(0.8)  # the first round sets the score
    router.observe(RoundFeedback({"code": 0.5}, {"code": 1.0}, 3.0))
    assert router.score("code") == pytest.approx(0.5 * 0.8 + 0.5 * harmonic(0.5, 1.0))
    router.observe(RoundFeedback({"code": 0.9}, {}, 3.0))  # no agreement reported counts as none
    assert router.score("code") == pytest.approx(0.5 * (0.5 * 0.8 + 0.5 * 2 / 3))
    assert router.states["code"].tries == 3 and router.states["prose"].tries == 0
    assert list(router.states["code"].recent) == [3.0, 3.0, 3.0]


def test_cold_start_explores_with_every_drafter_best_prior_first():
    router = RequestRouter(NAMES, prior={"records": 3.5, "code": 2.0, "prose": 2.2})
    assert router.exploring()
    assert router.choose(NAMES) == ["records", "prose", "code"]
    assert router.choose(NAMES, max_cooperating=1) == ["records"]


def test_explore_exploit_switch():
    router = RequestRouter(NAMES, RoutingSettings(window=2))
    router.observe(feedback(4.0, code=0.9, prose=0.3, records=0.2))
    router.observe(feedback(4.0, code=0.9, prose=0.3, records=0.2))
    assert router.recent_acceptance() == pytest.approx(4.0)
    assert router.choose(NAMES) == ["code"]  # exploit: nobody is close to the best
    assert router.last_mode == "exploit"
    router.observe(feedback(1.0, code=0.9))
    router.observe(feedback(1.0, code=0.9))  # the window (2) now holds only poor rounds
    assert router.recent_acceptance() == pytest.approx(1.0)
    assert router.choose(NAMES) == ["code", "prose", "records"]  # explore: best plus the others
    assert router.last_mode == "explore"


def test_ucb_tries_untried_drafters_first():
    names = ["a", "b", "c", "d"]
    router = RequestRouter(names, RoutingSettings(max_cooperating=2, min_tries=2))
    for _ in range(2):
        router.observe(feedback(1.0, a=0.9))
    assert router.choose(names) == ["a", "b"]  # untried, ties by name
    for _ in range(2):
        router.observe(feedback(1.0, a=0.9, b=0.1))
    assert router.choose(names) == ["a", "c"]  # b has had its tries: c is next
    for _ in range(2):
        router.observe(feedback(1.0, a=0.9, c=0.1))
    assert router.choose(names) == ["a", "d"]
    for _ in range(2):
        router.observe(feedback(1.0, a=0.9, d=0.1))
    # Everyone tried, equal scores among b, c, d: the upper confidence bound prefers the least tried.
    router.observe(feedback(1.0, a=0.9, b=0.1))
    router.observe(feedback(1.0, a=0.9, c=0.1))
    assert router.states["d"].tries < router.states["b"].tries
    assert router.choose(names) == ["a", "d"]


def test_ucb_prefers_a_better_score_at_equal_tries():
    router = RequestRouter(["a", "b", "c"], RoutingSettings(max_cooperating=2, min_tries=1))
    router.observe(feedback(1.0, a=0.9, b=0.3, c=0.6))
    assert router.choose(["a", "b", "c"]) == ["a", "c"]


def test_cooperating_count_follows_scores():
    router = RequestRouter(NAMES, RoutingSettings(cooperate_within=0.15, explore_below=2.0, smoothing=0.5))
    router.observe(feedback(3.5, code=0.9, prose=0.85, records=0.2))
    assert router.choose(NAMES) == ["code", "prose"]  # prose is within 15 % of code, records is not
    for _ in range(3):
        router.observe(feedback(3.5, code=0.9, prose=0.9, records=0.9))
    assert router.choose(NAMES) == ["code", "prose", "records"]  # records caught up
    for _ in range(3):
        router.observe(feedback(3.5, code=0.9, prose=0.3, records=0.2))
    assert router.choose(NAMES) == ["code"]  # both fell behind: the best drafts alone


def test_available_and_pinned_restrict_the_choice():
    router = RequestRouter(NAMES, prior={"code": 4.0, "prose": 2.0, "records": 3.0})
    assert router.choose(["prose", "records"]) == ["records", "prose"]  # the best one is not available
    assert router.choose(["prose"]) == ["prose"]
    assert router.choose([]) == []
    assert router.choose(NAMES, pinned=["prose", "code"]) == ["code", "prose"]  # exactly those, best first
    assert router.choose(["prose", "records"], pinned=["code", "prose"]) == ["prose"]  # pinned but dead: dropped
    assert router.choose(NAMES + ["newcomer"])[0] == "code"  # an unknown drafter is accepted, unscored


def test_prior_is_overcome_by_feedback():
    router = RequestRouter(["a", "b"], RoutingSettings(prior_weight=2.0), prior={"a": 4.0, "b": 2.0})
    assert router.choose(["a", "b"])[0] == "a"
    for _ in range(4):
        router.observe(feedback(3.0, a=0.2, b=0.9))
    assert router.choose(["a", "b"])[0] == "b"


def test_prior_is_relative_to_what_the_request_has_seen():
    router = RequestRouter(["a", "b", "c"], prior={"a": 2.0, "b": 4.0})
    assert router.prior_score("b") == pytest.approx(1.0)  # the best prior, before any feedback
    assert router.prior_score("a") == pytest.approx(0.5 / 0.75)  # kept share 1 - 1/L, relative to the best
    assert router.prior_score("c") is None and router.score("c") == 0.0
    router.observe(feedback(2.0, a=0.2, c=0.4))
    # Observed scores are small here: an untried drafter's prior is scaled to them, not to 1.
    assert router.prior_score("b") == pytest.approx(0.3)
    assert router.score("b") == pytest.approx(0.3)
    assert router.score("c") == pytest.approx(0.4)  # no prior: just what was seen


def test_router_is_deterministic():
    def run() -> list[list[str]]:
        router = RequestRouter(NAMES, prior={"code": 2.5})
        out = []
        for i in range(8):
            chosen = router.choose(NAMES)
            out.append(chosen)
            router.observe(feedback(1.0 + i % 3, **{n: 0.3 + 0.1 * j for j, n in enumerate(chosen)}))
        return out

    assert run() == run()


def test_settings_validate():
    with pytest.raises(ValueError):
        RoutingSettings(smoothing=0.0)
    with pytest.raises(ValueError):
        RoutingSettings(max_cooperating=0)
    with pytest.raises(ValueError):
        RoutingSettings(cooperate_within=1.5)


def test_prior_table_learns_online():
    table = PriorTable(neutral=2.0, bonus=0.25)
    # Nothing known: neutral everywhere, plus a small bonus for the drafter the feature names.
    assert table.prior("code", NAMES) == {"code": 2.25, "prose": 2.0, "records": 2.0}

    def best() -> str:
        prior = table.prior("code", NAMES)
        return max(sorted(NAMES), key=prior.get)

    assert best() == "code"
    for _ in range(3):
        table.update("code", "prose", 3.0)
        table.update("code", "code", 2.0)
    assert table.prior("code", NAMES)["code"] == pytest.approx(2.0)  # data replaces the bonus
    assert best() == "prose"  # what the requests showed, not what the feature's name said
    # Another feature falls back to the drafters' means over every feature (the bonus while it has no data).
    other = table.prior("records", NAMES)
    assert other["prose"] == pytest.approx(3.0) and other["code"] == pytest.approx(2.0)
    assert other["records"] == pytest.approx(2.25)
    table.update("records", "records", 5.0)
    assert table.prior("records", NAMES)["records"] == pytest.approx(5.0)
    assert table.prior("code", NAMES)["records"] == pytest.approx(5.0)  # the global mean now knows records


def test_prior_table_round_trip():
    table = PriorTable(neutral=1.5, bonus=0.5)
    table.update("code", "code", 3.0)
    table.update("code", "prose", 2.0)
    table.update("prose", "prose", 4.0)
    data = json.loads(json.dumps(table.to_dict()))
    back = PriorTable.from_dict(data)
    for feature in ("code", "prose", "records", "unseen"):
        assert back.prior(feature, NAMES + ["x"]) == table.prior(feature, NAMES + ["x"])
    assert back.to_dict() == table.to_dict()
    with pytest.raises(ValueError):
        PriorTable.from_dict({"version": 99})


def test_agreement_is_the_share_of_votes_the_target_committed():
    votes = {"all": [0, 1], "half": [2, 1], "none": [1, 0], "short": [0], "empty": []}
    scores = agreement(votes, [0, 1, 2])
    assert scores == {"all": 1.0, "half": 0.5, "none": 0.0, "short": 1.0}  # only depths both lists have
    assert agreement({}, [0]) == {}
    assert agreement({"a": [0]}, []) == {}


def test_round_feedback():
    fb = round_feedback({"a": [1, 2], "b": [1, 3]}, {"a": [0.5, 0.5], "b": [0.9, 0.1]}, [1, 2, 5], accepted=2)
    assert fb.agreement == {"a": 1.0, "b": 0.5}
    assert fb.confidence == {"a": 0.5, "b": pytest.approx(0.5)}
    assert fb.acceptance_length == 3.0


def test_solo_acceptance():
    votes = {"a": [1, 2, 3], "b": [1, 9, 3], "c": [5], "d": []}
    assert solo_acceptance(votes, [1, 2, 4]) == {"a": 3.0, "b": 2.0, "c": 1.0, "d": 1.0}
    assert solo_acceptance(votes, []) == {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}


def test_mean_confidence():
    assert mean_confidence({"a": [0.5, 1.0], "b": []}) == {"a": pytest.approx(0.75)}
