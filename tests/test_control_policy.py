"""The speculation-control rules, without Redis: idle -> lengthen, backlog -> shorten, hysteresis, bounds."""

from __future__ import annotations

import math

import pytest

from cosine.policy.control_policy import (
    ControlDecision,
    ControlInputs,
    ControlPolicy,
    ControlSettings,
    StreamDepth,
    WorkerLoad,
    signals,
)


def inputs(at_ms=1_000, verifier_busy=0.7, drafter_busy=0.3, draft_depth=0, draft_age=0.0, verify_depth=0,
           verify_age=0.0, active=4, capacity=32, waiting=0, drafters=1, verifiers=1) -> ControlInputs:
    return ControlInputs(
        at_ms=at_ms,
        requests=StreamDepth("p:requests", waiting, active * verifiers),
        drafts=[StreamDepth(f"p:draft:d{i}", 0, draft_depth, draft_age) for i in range(drafters)],
        verifies=[StreamDepth(f"p:verify:v{i}", 0, verify_depth, verify_age) for i in range(verifiers)],
        verifiers=[WorkerLoad(f"v{i}", "verifier", verifier_busy, active, capacity) for i in range(verifiers)],
        drafters=[WorkerLoad(f"d{i}", "drafter", drafter_busy, active) for i in range(drafters)],
    )


IDLE = dict(verifier_busy=0.1, drafter_busy=0.2)
PILING = dict(draft_depth=200, drafter_busy=0.95)
BOTTLENECK = dict(verifier_busy=0.97, verify_depth=40, verify_age=400.0)
CALM = dict(verifier_busy=0.7, drafter_busy=0.4)


def run(policy: ControlPolicy, decision: ControlDecision, n: int, **kw) -> list[ControlDecision]:
    out = []
    for i in range(n):
        decision = policy.decide(inputs(at_ms=1000 + i, **kw), decision)
        out.append(decision)
    return out


@pytest.fixture
def policy():
    return ControlPolicy(ControlSettings(k_max_default=4, hysteresis_samples=3, drift_samples=10))


@pytest.fixture
def start(policy):
    return policy.initial(version=1)


def test_initial_decision_is_the_defaults(policy):
    s = policy.settings
    d = policy.initial()
    assert (d.version, d.k_min, d.k_max, d.max_cooperating) == (0, s.k_min, s.k_max_default, s.cooperating_default)
    assert (d.verifier_max_batch, d.verifier_token_cap, d.pressure) == (s.batch_default, s.token_cap_default, 0.0)


def test_idle_verifier_lengthens_after_hysteresis(policy, start):
    ds = run(policy, start, 3, **IDLE)
    assert ds[0] is start and ds[1] is start  # two samples are not enough
    d = ds[2]
    assert d.version == start.version + 1
    assert d.k_max == start.k_max + 1 and d.max_cooperating == start.max_cooperating + 1
    assert d.pressure < 0 and "idle" in d.reason and d.at_ms == 1002


def test_idle_needs_work_and_spare_drafters(policy, start):
    assert run(policy, start, 6, active=0, **IDLE)[-1] is start  # an empty system is not "idle"
    assert run(policy, start, 6, verifier_busy=0.1, drafter_busy=0.75)[-1] is start  # drafters have no room
    assert run(policy, start, 6, verifier_busy=0.1, drafter_busy=0.2, drafters=0)[-1] is start


def test_drafts_piling_shortens(policy, start):
    d = run(policy, start, 3, **PILING)[-1]
    assert d.version == start.version + 1
    assert d.k_max == start.k_max - 1 and d.max_cooperating == start.max_cooperating - 1
    assert d.pressure > 0 and "pile" in d.reason


@pytest.mark.parametrize("kw", [dict(draft_depth=100), dict(draft_age=500.0), dict(drafter_busy=0.97)])
def test_each_piling_signal_alone_shortens(policy, start, kw):
    d = run(policy, start, 3, verifier_busy=0.7, **kw)[-1]
    assert d.k_max == start.k_max - 1 and d.pressure > 0


def test_backlog_is_per_drafter(policy, start):
    # 100 jobs over 4 drafters = 25 each: below the per-drafter threshold
    d = run(policy, start, 5, verifier_busy=0.7, draft_depth=25, drafters=4)[-1]
    assert d is start


def test_verifier_bottleneck_raises_batch_and_leaves_draft_lengths_alone(policy, start):
    s = policy.settings
    d = run(policy, start, 3, **BOTTLENECK)[-1]
    assert d.verifier_max_batch == s.batch_default + s.batch_step and d.k_max == start.k_max
    assert d.verifier_token_cap == policy.token_cap_for(d.verifier_max_batch) > start.verifier_token_cap
    assert d.pressure == 0 and "bottleneck" in d.reason
    for _ in range(20):
        d = run(policy, d, 3, **BOTTLENECK)[-1]
    assert d.verifier_max_batch == s.batch_highest
    assert d.verifier_token_cap <= s.token_cap_highest
    # Sustained overload does not ratchet k_max down: the per-request policy prices a drafted token's share
    # of the pass (shorter drafts commit fewer tokens per pass, which a bottlenecked verifier can least afford).
    assert d.k_max == start.k_max and d.pressure == 0


def test_busy_verifier_without_backlog_is_no_bottleneck(policy, start):
    assert run(policy, start, 6, verifier_busy=0.97, drafter_busy=0.4)[-1] is start


def test_waiting_requests_with_full_verifiers_is_a_bottleneck(policy, start):
    d = run(policy, start, 3, verifier_busy=0.95, active=32, capacity=32, waiting=5)[-1]
    assert d.verifier_max_batch > start.verifier_max_batch
    # the same queue with room left is just admission in progress
    policy.reset()
    assert run(policy, start, 6, verifier_busy=0.95, active=10, capacity=32, waiting=5)[-1] is start


def test_hysteresis_resets_on_an_interruption(policy, start):
    d = start
    for kw in (IDLE, IDLE, CALM, IDLE, IDLE):
        d = policy.decide(inputs(**kw), d)
    assert d is start
    d = policy.decide(inputs(**IDLE), d)
    assert d.k_max == start.k_max + 1


def test_one_action_per_hysteresis_window(policy, start):
    ds = run(policy, start, 9, **IDLE)
    versions = [d.version for d in ds]
    assert versions == [1, 1, 2, 2, 2, 3, 3, 3, 4]


def test_bounds_hold_under_sustained_pressure(policy, start):
    s = policy.settings
    d = run(policy, start, 60, **IDLE)[-1]
    assert d.k_max == s.k_max_highest and d.max_cooperating == s.cooperating_highest
    top = d.version
    assert run(policy, d, 9, **IDLE)[-1].version == top  # nothing left to change: no new versions
    d = run(policy, d, 60, **PILING)[-1]
    assert d.k_max == s.k_max_lowest and d.max_cooperating == s.cooperating_lowest
    assert 0 <= d.k_min <= d.k_max and -1 <= d.pressure <= 1


def test_version_increments_only_on_change(policy, start):
    d = start
    versions = set()
    for i in range(50):
        kw = (IDLE, PILING, CALM, BOTTLENECK)[(i // 7) % 4]
        new = policy.decide(inputs(**kw), d)
        if new is d:
            assert new.version == d.version
        else:
            assert new.version == d.version + 1 and new.controls() != d.controls()
        versions.add(new.version)
        d = new
    assert versions == set(range(1, d.version + 1))


def test_calm_decays_pressure_then_drifts_back_to_defaults(policy, start):
    s = policy.settings
    d = run(policy, start, 9, **IDLE)[-1]
    assert d.k_max == start.k_max + 3 and d.pressure < 0
    ds = run(policy, d, 3, **CALM)
    assert abs(ds[-1].pressure) < abs(d.pressure)
    ds = run(policy, ds[-1], 400, **CALM)
    end = ds[-1]
    assert end.controls() == policy.initial().controls()
    assert end.pressure == 0.0
    # one field at a time, slowly: never more than one k step per drift window
    ks = [x.k_max for x in ds]
    assert all(abs(a - b) <= s.k_step for a, b in zip(ks, ks[1:]))
    assert run(policy, end, 50, **CALM)[-1] is end  # at the defaults nothing changes any more


def test_out_of_bounds_previous_is_clamped(policy):
    wild = ControlDecision(7, 0, 20, 9, 10_000, 1_000_000, 5.0, "old")
    d = policy.decide(inputs(**CALM), wild)
    s = policy.settings
    assert d.version == 8 and "bounds" in d.reason
    assert d.k_max == s.k_max_highest and d.max_cooperating == s.cooperating_highest
    assert d.verifier_max_batch == s.batch_highest and d.verifier_token_cap == s.token_cap_highest
    assert d.pressure == 1.0


def test_no_workers_is_calm(policy, start):
    empty = ControlInputs(at_ms=5)
    g = signals(empty)
    assert g.verifiers == 0 and g.draft_backlog == 0
    assert policy.decide(empty, start) is start


def test_null_lag_counts_as_zero():
    sd = StreamDepth("s", None, 3, 10.0, 20.0)
    assert sd.depth == 3 and sd.age_ms == 20.0


def test_signals():
    g = signals(inputs(verifier_busy=0.5, drafter_busy=0.25, draft_depth=10, verify_depth=4, active=8, capacity=16,
                       waiting=3, drafters=2, verifiers=2))
    assert (g.verifiers, g.drafters, g.active_requests, g.requests_waiting) == (2, 2, 16, 3)
    assert g.verifier_fill == 0.5 and g.draft_backlog == 10 and g.verify_backlog == 4


def test_decision_roundtrip_through_a_redis_hash():
    d = ControlDecision(12, 1, 5, 2, 40, 2560, -0.6, "verifier idles: k_max 4->5", 1234)
    h = d.to_dict()
    assert all(isinstance(v, (str, int, float)) for v in h.values())
    as_bytes = {k.encode(): str(v).encode() for k, v in h.items()}
    assert ControlDecision.from_dict(as_bytes) == d
    assert ControlDecision.from_dict(h) == d
    assert d.clamp_k(9) == 5 and d.clamp_k(0) == 1 and d.clamp_k(3) == 3


@pytest.mark.parametrize("bad", [
    {"k_max": "x"}, {"k_min": "6"}, {"max_cooperating": "0"}, {"pressure": "2"}, {"pressure": "nan"},
    {"version": "-1"}, {"verifier_token_cap": "0"},
])
def test_malformed_decisions_are_refused(bad):
    h = {**ControlDecision(3, 1, 5, 2, 32, 2048).to_dict(), **bad}
    with pytest.raises(ValueError):
        ControlDecision.from_dict(h)
    h = ControlDecision(3, 1, 5, 2, 32, 2048).to_dict()
    del h["k_max"]
    with pytest.raises(ValueError):
        ControlDecision.from_dict(h)


def test_inputs_roundtrip():
    i = inputs(drafters=2, verifiers=2, draft_depth=3)
    assert ControlInputs.from_dict(i.to_dict()) == i


@pytest.mark.parametrize("kw", [dict(k_min=5), dict(k_max_highest=9), dict(cooperating_highest=4),
                                dict(batch_lowest=0), dict(hysteresis_samples=0)])
def test_settings_are_checked(kw):
    with pytest.raises(ValueError):
        ControlSettings(**kw)


def test_pressure_is_quantised(policy, start):
    d = run(policy, start, 3, verifier_busy=0.33, drafter_busy=0.2)[-1]
    assert math.isclose(d.pressure * 10, round(d.pressure * 10))


def test_k_min_follows_the_settings_and_never_exceeds_k_max():
    p = ControlPolicy(ControlSettings(k_min=1, k_max_lowest=1, hysteresis_samples=1))
    d = p.initial(version=1)
    assert d.k_min == 1
    for _ in range(10):
        d = p.decide(inputs(**PILING), d)
    assert d.k_min == d.k_max == 1
    assert ControlPolicy().initial().k_min == 0  # by default a request's own policy may switch speculation off
