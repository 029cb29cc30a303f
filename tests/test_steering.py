"""Steering (the verifier's use of the policies): a round's ks adjusted together (alignment, the token cap)."""

from __future__ import annotations

import dataclasses

from cosine.policy.control_policy import ControlDecision
from cosine.policy.cost_model import CostModel
from cosine.policy.steering import Load, Steering, Switches

# A large target on a GPU: the pass hardly grows with the tokens fed. A small one on a CPU: it does.
GPU = CostModel(verify_base_ms=28.0, verify_token_ms=0.08, draft_step_ms=1.5, draft_row_ms=0.02)
CPU = CostModel(verify_base_ms=7.3, verify_token_ms=0.37, verify_context_ms=0.0021, draft_overhead_ms=0.24,
                draft_step_ms=0.56, draft_row_ms=0.12)
PADDED_CPU = dataclasses.replace(CPU, padded=True)  # cosine's runner: every row computes the largest tree


def steered(steering: Steering, rate_rounds: list[tuple[int, int]]):
    steer = steering.new()
    for drafted, accepted in rate_rounds:
        steer.spec.observe(drafted, accepted)
    return steer


def round_ks(steering: Steering, steers: dict, modes: dict | None = None, room: int = 100,
             token_cap: int = 2048, load: Load | None = None) -> dict[str, int]:
    """What the verifier does for the jobs going out together: k_for each, then cap all of them."""
    modes, load = modes or {}, load or Load(control=decision())
    ks = {rid: steering.k_for(s, modes.get(rid, "adaptive"), 6, room, load) for rid, s in steers.items()}
    adaptive = {rid: (s, room) for rid, s in steers.items() if steering.adapts(modes.get(rid, "adaptive"))}
    return steering.cap(ks, 1, token_cap, load, adaptive)


def decision(k_max: int = 8, pressure: float = 0.0) -> ControlDecision:
    return ControlDecision(1, 0, k_max, 2, 32, 2048, pressure)


CONTROLLED = Load(control=decision())


def test_a_round_waits_for_its_longest_draft_so_short_ones_are_lengthened_on_a_gpu():
    s = Steering(Switches(), k=4, cost=GPU)
    good = steered(s, [(8, 8)] * 6)  # acceptance near 1: the longest draft
    fair = steered(s, [(4, 2)] * 6)  # about 0.6
    ks_alone = {rid: s.controller.k_for(st.spec, bounds=(0, 8)) for rid, st in {"g": good, "f": fair}.items()}
    assert ks_alone["f"] < ks_alone["g"] == 8
    out = round_ks(s, {"g": good, "f": fair})
    assert out == {"g": 8, "f": 8}
    # The request's own choice is kept for its hysteresis; only this round's job is lengthened.
    assert fair.spec.k < 8


def test_no_alignment_on_a_cpu_target_for_a_poor_request_or_without_adaptive_control():
    s = Steering(Switches(), k=4, cost=CPU)
    good = steered(s, [(8, 8)] * 6)
    poor = steered(s, [(4, 1)] * 6)  # about 0.3
    out = round_ks(s, {"g": good, "p": poor})
    assert out["p"] < out["g"]
    # Adaptive control off: every request drafts the verifier's k, untouched.
    s = Steering(Switches(adaptive=False), k=4, cost=GPU)
    assert round_ks(s, {"a": s.new(), "b": s.new()}) == {"a": 4, "b": 4}


def test_alignment_respects_room_fixed_requests_and_the_token_cap():
    s = Steering(Switches(), k=4, cost=GPU)
    good = steered(s, [(8, 8)] * 6)
    fair = steered(s, [(4, 2)] * 6)
    # A request asking for a fixed k keeps it, and is not lengthened; the others may reach its length.
    fixed = s.new()
    out = round_ks(s, {"g": good, "x": fixed}, modes={"x": "fixed"})
    assert out["x"] == 6
    # Room: no request drafts past what it can still use.
    rooms = {"g": 8, "f": 3}
    steers = {"g": good, "f": fair}
    ks = {rid: s.k_for(st, "adaptive", None, rooms[rid], CONTROLLED) for rid, st in steers.items()}
    assert s.cap(ks, 1, 2048, CONTROLLED, {rid: (st, rooms[rid]) for rid, st in steers.items()})["f"] <= 3
    # The token cap still wins: 2 roots + 16 draft tokens > 12.
    out = round_ks(s, {"g": good, "f": fair}, token_cap=12)
    assert sum(1 + k for k in out.values()) <= 12


def test_only_the_adaptive_requests_named_are_lengthened():
    s = Steering(Switches(), k=4, cost=GPU)
    good = steered(s, [(8, 8)] * 6)
    fair = steered(s, [(4, 2)] * 6)
    k_fair = s.k_for(fair, "adaptive", None, 100, CONTROLLED)
    assert s.cap({"g": 8, "f": k_fair}, 1, 2048, CONTROLLED) == {"g": 8, "f": k_fair}  # none named: none lengthened
    assert round_ks(s, {"g": good, "f": fair}) == {"g": 8, "f": 8}


def test_verify_cost_follows_the_batch_and_the_knee():
    cpu = Steering(Switches(), k=4, cost=CPU)
    alone = cpu.verify_cost(Load(batch=1))
    assert 0 < alone < cpu.verify_cost(Load(batch=8)) < 1  # a drafted token weighs more when the pass is shared by more
    short = cpu.verify_cost(Load(batch=8))
    assert cpu.verify_cost(Load(batch=8, context=300)) < short  # attention over a long context is part of every share
    knee = CostModel(verify_base_ms=28.0, verify_token_ms=0.2, verify_free_tokens=96)
    big = Steering(Switches(), k=4, cost=knee)
    assert big.verify_cost(Load(batch=8)) == 0.0  # 8 x 5 tokens sit under the knee: drafts cost the pass nothing


def test_a_padded_round_drafts_one_depth_even_for_requests_switched_off():
    s = Steering(Switches(), k=4, cost=PADDED_CPU)
    three = Load(batch=3, control=decision())
    good = steered(s, [(8, 8)] * 6)
    poor = steered(s, [(4, 1)] * 6)
    off = steered(s, [(4, 0)] * 12)
    assert s.k_for(steered(s, [(4, 0)] * 12), "adaptive", None, 100, three) == 0
    out = round_ks(s, {"g": good, "p": poor, "o": off}, load=three)
    # A plain step beside the others would compute their slots for one token: everyone drafts the same.
    assert len(set(out.values())) == 1 and 1 <= out["g"] <= 8
    # Packed tokens: each keeps a length of its own, and the one switched off stays off.
    packed = Steering(Switches(), k=4, cost=CPU)
    steers = {"g": steered(packed, [(8, 8)] * 6), "p": steered(packed, [(4, 1)] * 6),
              "o": steered(packed, [(4, 0)] * 12)}
    mixed = round_ks(packed, steers)
    assert mixed["o"] == 0 and mixed["p"] < mixed["g"]


def test_a_padded_round_stays_within_the_longest_asked_for_room_and_fixed_lengths():
    s = Steering(Switches(), k=4, cost=PADDED_CPU)
    good = steered(s, [(8, 8)] * 6)
    fair = steered(s, [(4, 2)] * 6)
    assert max(round_ks(s, {"g": good, "f": fair}, load=Load(control=decision(k_max=3))).values()) <= 3
    rooms = {"g": 8, "f": 2}
    steers = {"g": good, "f": fair}
    ks = {rid: s.k_for(st, "adaptive", None, rooms[rid], CONTROLLED) for rid, st in steers.items()}
    assert s.cap(ks, 1, 2048, CONTROLLED, {rid: (st, rooms[rid]) for rid, st in steers.items()})["f"] <= 2
    # A fixed request pads the pass to its 6 positions: the adaptive one drafts as many, free to verify.
    poor = steered(s, [(4, 1)] * 6)
    out = round_ks(s, {"p": poor, "x": s.new()}, modes={"x": "fixed"})
    assert out == {"p": 6, "x": 6}
    # The token cap counts every row at the largest tree: 2 rows x (1 + k) <= 10.
    out = round_ks(s, {"g": good, "f": fair}, token_cap=10)
    assert 2 * (1 + max(out.values())) <= 10


def test_fused_siblings_are_priced_as_the_tokens_they_feed():
    """A drafted position feeds the spine node and the siblings fusion kept: the verification price of a
    position, and the width the token cap counts, follow the draft trees the verifier is sent."""
    s = Steering(Switches(), k=4, cost=CPU)
    busy = Load(batch=8, context=150)
    chains = s.verify_cost(busy)
    steer = s.new()
    for _ in range(200):  # trees of three nodes per position (each expert's candidate kept)
        s.observe(steer, 4, 2, [1, 2, 3], {}, {}, nodes=12)
    assert abs(s.nodes_per_depth - 3.0) < 0.01
    assert s.verify_cost(busy) > 2.5 * chains
    # The token cap counts three slots per position now: 4 requests at k=8 (4 x 25 = 100 > 64) are cut.
    ks = s.cap({str(i): 8 for i in range(4)}, 1, 64, busy)
    assert sum(1 + 3 * k for k in ks.values()) <= 64
    # A draft cut short by its request's room says nothing about the tree shape, nor does a plain step.
    s.observe(steer, 2, 1, [1, 2], {}, {}, nodes=0)
    s.observe(steer, 0, 0, [1], {}, {}, nodes=0)
    assert abs(s.nodes_per_depth - 3.0) < 0.01


def test_drafting_is_priced_by_the_part_of_it_a_round_waits_for():
    """The verifier's measured wait for drafts, set against the drafting time predicted for the jobs it
    sent: 1 until a pass is seen, about 0 when drafts come back while it is busy with other requests."""
    s = Steering(Switches(), k=4, cost=CPU)
    assert s.draft_share() == 1.0
    ks = s.cap({str(i): 4 for i in range(8)}, 1, 2048, Load())
    assert s.draft_ms_sent == CPU.draft_ms(8, 4)
    s.observe_pass(draft_wait_ms=50.0, overhead_ms=3.0)
    assert s.draft_share() == 1.0  # waited longer than drafting takes: all of it is on the round's path
    for _ in range(100):
        s.observe_pass(draft_wait_ms=0.0, overhead_ms=3.0)
    assert s.draft_share() < 0.01 and abs(s.pass_overhead_ms - 3.0) < 1e-6
    assert ks == {str(i): 4 for i in range(8)}


def test_a_loaded_verifier_that_never_waits_for_drafts_drafts_longer():
    """Under load on a CPU target, a round's drafting runs while the verifier verifies other requests, and
    its own work between passes (Redis, scheduling, prefilling arrivals) is paid per pass whatever the depth:
    priced as the cost model's bare forward plus drafting, rounds drafted shorter than the best fixed length."""
    def depth(wait_ms: float | None, overhead_ms: float) -> int:
        s = Steering(Switches(), k=4, cost=PADDED_CPU)
        load = Load(batch=16, context=250, control=decision())
        steers = {str(i): steered(s, [(4, 3)] * 6) for i in range(8)}  # acceptance about 0.75
        steers["good"] = steered(s, [(8, 8)] * 6)  # asks for the longest draft
        if wait_ms is not None:
            round_ks(s, steers, load=load)  # the jobs' predicted drafting time, which the wait is set against
            for _ in range(50):
                s.observe_pass(wait_ms, overhead_ms)
        return max(round_ks(s, steers, load=load).values())

    priced_in_full = depth(None, 0.0)
    assert depth(100.0, 0.0) == priced_in_full  # a verifier waiting for its drafts: as before
    assert depth(0.0, 0.0) > priced_in_full  # drafts back before they are needed: drafting is off the path
    assert depth(0.0, 30.0) > depth(0.0, 0.0)  # a round's own overhead makes every position cheaper
