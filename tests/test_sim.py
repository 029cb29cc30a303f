"""The cluster simulation: cost models, acceptance model, simulated engines, and a 2 x 16 cluster over Redis."""

from __future__ import annotations

import pytest

from cosine.engine.fused_drafter import FusedRequest
from cosine.engine.sequence import Sequence, SpecStats
from cosine.engine.tree import DraftTree
from cosine.errors import InvalidParameterError
from cosine.local_redis import LocalRedis
from cosine.sampling_params import SamplingParams
from cosine.sim.costs import (
    A100X4_70B,
    CARD_K,
    CARD_MAL,
    RTX3090_68M,
    AcceptanceModel,
    TargetCost,
    alpha_of_mal,
    mal_of_alpha,
    parse_card,
    sim_cost_model,
)
from cosine.sim.engines import (
    DOMAIN_MARKERS,
    RESERVED,
    SimFusedDrafter,
    SimModel,
    SimTarget,
    SimTokenizer,
    SimWorkload,
    domain_of,
    sim_features,
)

EXPERTS = ["code", "prose", "records"]


# -- costs and acceptance ---------------------------------------------------------------------------------
def test_acceptance_table_matches_the_model_card():
    k, table = parse_card()
    assert k == CARD_K
    assert table == CARD_MAL, "zoo/MODEL_CARD.md changed: update CARD_MAL in cosine/sim/costs.py"
    assert AcceptanceModel.from_card().alphas == AcceptanceModel().alphas


def test_alpha_inverts_the_mean_acceptance_length():
    for mal in (1.0, 1.088, 2.625, 3.795, 4.99):
        assert mal_of_alpha(alpha_of_mal(mal, 4), 4) == pytest.approx(mal, abs=1e-6)
    model = AcceptanceModel()
    for expert, row in CARD_MAL.items():
        for domain, mal in row.items():
            assert model.expected_mal(expert, domain, CARD_K) == pytest.approx(mal, abs=1e-6)
    # the diagonal (own domain) is every domain's best drafter
    for domain in EXPERTS:
        assert max(EXPERTS, key=lambda e: model.alpha(e, domain)) == domain
    assert model.alpha("unknown", "code") == model.unknown_alpha
    with pytest.raises(ValueError):
        alpha_of_mal(5.5, 4)


def test_cost_profiles_follow_the_roofline():
    t = A100X4_70B
    one = t.verify_ms(1, 1, 256)
    assert 28 < one < 32  # a 70B decode step on 4 A100s: ~22 ms of weight reads + ~8 ms of overhead
    assert t.verify_ms(8, 40, 256) - one < 1  # verifying drafts is memory-bound: nearly free
    assert t.verify_ms(32, 800, 256) > 2 * one  # until the batch's tokens make it compute-bound
    assert t.verify_ms(8, 40, 2000) > t.verify_ms(8, 40, 200)  # KV reads grow with context
    assert t.verify_ms(0, 0, 0) == 0.0
    assert t.prefill_ms(2000) > t.prefill_ms(10) >= t.overhead_ms + t.weights_ms
    d = RTX3090_68M
    assert d.draft_step_ms(1) == pytest.approx(1.52)
    assert d.draft_step_ms(16) > d.draft_step_ms(1)
    assert d.draft_step_ms(0) == 0.0
    assert d.prefill_ms(128) > d.step_ms
    assert TargetCost(weights_ms=10).verify_ms(1, 1, 0) == pytest.approx(18.0)


def test_scheduler_cost_model_is_fitted_to_the_simulated_hardware():
    m = sim_cost_model()
    assert m.verify_ms(1, 128, 1) == pytest.approx(A100X4_70B.verify_ms(1, 1, 128), rel=0.1)
    assert m.verify_ms(16, 128, 80) == pytest.approx(A100X4_70B.verify_ms(16, 80, 128), rel=0.2)
    assert m.draft_ms(4, 4) == pytest.approx(4 * RTX3090_68M.draft_step_ms(4), rel=0.05)
    assert m.metadata["target"] == A100X4_70B.name


# -- workload, tokenizer, model -----------------------------------------------------------------------------
def test_workload_marks_domains_and_is_reproducible():
    a = SimWorkload({"code": 1, "records": 3}, (8, 16), seed=7).prompts(40)
    b = SimWorkload({"code": 1, "records": 3}, (8, 16), seed=7).prompts(40)
    assert [p.ids for p in a] == [p.ids for p in b]
    assert {p.domain for p in a} == {"code", "records"}
    for p in a:
        assert domain_of(p.ids) == p.domain and p.ids[0] == DOMAIN_MARKERS[p.domain]
        assert 8 <= len(p.ids) <= 16 and all(RESERVED <= t for t in p.ids[1:])
    with pytest.raises(ValueError):
        SimWorkload({"poetry": 1.0})


def test_tokenizer_round_trips_ids():
    tok = SimTokenizer()
    ids = [DOMAIN_MARKERS["prose"], 17, 31999, 500]
    assert tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids
    assert tok.eos_token_id is None
    assert all(RESERVED <= i < tok.vocab_size for i in tok("hello world")["input_ids"])


def test_model_is_deterministic_and_keyed():
    m = SimModel(seed=3)
    prompt = [1, 100, 200, 300]
    assert m.continuation(prompt, 20) == SimModel(seed=3).continuation(prompt, 20)
    assert m.continuation(prompt, 20) != SimModel(seed=4).continuation(prompt, 20)
    assert m.continuation(prompt, 20)[:5] == m.continuation(prompt, 5)
    assert all(RESERVED <= t < m.vocab_size for t in m.continuation(prompt, 50))


def test_features_are_mostly_the_prompt_domain():
    prompts = SimWorkload(seed=1).prompts(300)
    got = sim_features([p.ids for p in prompts], EXPERTS, accuracy=0.9)
    right = sum(g == p.domain for g, p in zip(got, prompts)) / len(prompts)
    assert 0.8 < right < 0.97
    assert sim_features([p.ids for p in prompts], ["prose"]) == ["prose"] * len(prompts)


# -- simulated engines ----------------------------------------------------------------------------------------
def _decode(target: SimTarget, prompts, drafter: SimFusedDrafter | None, experts, k=4, width=1, n=48):
    seqs = [Sequence(list(p.ids), SamplingParams(max_new_tokens=n, ignore_eos=True), seq_id=f"r{i}")
            for i, p in enumerate(prompts)]
    target.admit(seqs)
    while any(not s.finished for s in seqs):
        live = [s for s in seqs if not s.finished]
        drafts: dict[str, DraftTree | None] = {s.seq_id: None for s in live}
        if drafter is not None:
            reqs = [FusedRequest(s.seq_id, s.tokens, min(k, target.room(s)), experts, width) for s in live]
            for sid, d in drafter.draft(reqs).items():
                drafts[sid] = d.tree
        results = target.step(drafts)
        assert {r.seq.seq_id for r in results} == set(drafts)
    target.release([s.seq_id for s in seqs])
    return seqs


@pytest.mark.parametrize("experts,width", [(["code"], 1), (EXPERTS, 1), (EXPERTS, 2)])
def test_speculative_output_equals_target_only(experts, width):
    model = SimModel()
    prompts = SimWorkload(seed=2).prompts(12)
    plain = _decode(SimTarget(model, time_scale=0), prompts, None, experts)
    drafter = SimFusedDrafter(EXPERTS, model=model, time_scale=0)
    spec = _decode(SimTarget(model, time_scale=0), prompts, drafter, experts, width=width)
    stats = SpecStats()
    for a, b, p in zip(plain, spec, prompts):
        assert a.output_ids == b.output_ids == model.continuation(p.ids, 48)
        assert a.stats.drafts == 0 and a.stats.plain_steps > 0
        stats.merge(b.stats)
    assert stats.mean_acceptance_length > 1.2
    assert sum(stats.tokens_by_drafter.values()) == stats.accepted
    assert drafter.simulated_ms > 0


def test_single_expert_reproduces_the_measured_acceptance_length():
    """Chains of k=4 from one expert on its own domain: the card's mean acceptance length, within noise."""
    model = SimModel(seed=11)
    for domain in EXPERTS:
        prompts = SimWorkload({domain: 1.0}, seed=5).prompts(40)
        drafter = SimFusedDrafter(EXPERTS, model=model, time_scale=0)
        seqs = _decode(SimTarget(model, time_scale=0), prompts, drafter, [domain], n=65)
        stats = SpecStats()
        for s in seqs:
            stats.merge(s.stats)
        assert stats.mean_acceptance_length == pytest.approx(CARD_MAL[domain][domain], abs=0.2)


def test_drafts_are_reproducible_and_fusion_adds_alternatives():
    model = SimModel()
    prompt = SimWorkload({"prose": 1.0}, seed=9).prompts(1)[0].ids
    reqs = [FusedRequest("a", prompt, 4, EXPERTS)]
    one = SimFusedDrafter(EXPERTS, model=model, time_scale=0).draft(reqs)["a"]
    two = SimFusedDrafter(EXPERTS, model=model, time_scale=0).draft(reqs)["a"]
    assert one.tree.tokens == two.tree.tokens and one.votes == two.votes
    assert one.tree.depth == 4 and len(one.tree) >= 4
    assert set(one.votes) == set(EXPERTS) and all(len(v) == 4 for v in one.votes.values())
    with pytest.raises(ValueError):
        SimFusedDrafter(["code"], time_scale=0).draft([FusedRequest("a", prompt, 4, ["prose"])])
    # Asked to stop (drafting ahead when a job comes in), the drafts end at the depth reached, and only the
    # positions drafted are charged.
    for stop_at, depth in ((len(EXPERTS) + 1, 2), (2, 1)):  # asked before every expert's forward after depth 1
        calls = []
        stopped = SimFusedDrafter(EXPERTS, model=model, time_scale=0)
        cut = stopped.draft(reqs, stop=lambda: calls.append(1) or len(calls) >= stop_at)["a"]  # noqa: B023
        assert cut.tree.depth == depth and cut.tree.tokens == one.tree.truncated(depth).tokens
        assert all(v == one.votes[e][:depth] for e, v in cut.votes.items())
        assert stopped.steps == depth


def test_costs_are_charged_per_forward():
    model = SimModel()
    target = SimTarget(model, time_scale=0)
    prompts = SimWorkload(seed=4).prompts(4)
    seqs = _decode(target, prompts, None, EXPERTS, n=5)
    assert target.forwards == 5
    assert target.simulated_ms > 5 * A100X4_70B.verify_ms(1, 1, 0)
    assert all(len(s.output_ids) == 5 for s in seqs)
    drafter = SimFusedDrafter(["code", "prose"], model=model, time_scale=0)
    drafter.draft([FusedRequest("x", prompts[0].ids, 3, ["code", "prose"])])
    # new to both experts: a prefill each, then one step per expert per position
    expected = 2 * RTX3090_68M.prefill_ms(len(prompts[0].ids)) + 3 * 2 * RTX3090_68M.draft_step_ms(1)
    assert drafter.simulated_ms == pytest.approx(expected)


# -- the cluster -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def redis_url():
    with LocalRedis() as srv:
        yield srv.url


def test_cluster_of_16_drafters_is_lossless(redis_url):
    from cosine.sim.cluster import SimCluster, run_workload

    with SimCluster(redis_url, verifiers=2, drafters=16, time_scale=0.05) as cluster:
        assert cluster.controller is not None, cluster.controller_error
        workers = cluster.workers()
        assert sum(w.get("role") == "drafter" for w in workers.values()) == 16
        assert sum(w.get("role") == "verifier" for w in workers.values()) == 2
        result = run_workload(cluster, 32, concurrency=16, max_new_tokens=32, prompt_len=(16, 64), timeout=60)
        plain = run_workload(cluster, 6, concurrency=6, max_new_tokens=16, speculation="off", seed=3, timeout=60)
    assert result["errors"] == [] and result["completed"] == 32
    assert result["lossless"], result["mismatches"]
    assert result["tokens"] == 32 * 32
    assert result["mean_acceptance_length"] > 1.0
    assert result["drafters_used"] > 1
    assert set(result["mean_acceptance_length_by_domain"]) == set(EXPERTS)
    assert plain["lossless"] and plain["mean_acceptance_length"] is None and plain["plain_steps"] > 0


def test_cluster_open_loop_with_routing_and_fusion_off(redis_url):
    from cosine.policy.steering import Switches
    from cosine.sim.cluster import SimCluster, run_workload

    with SimCluster(redis_url, verifiers=1, drafters=3, experts_per_drafter=[("code",), ("prose",), ("records",)],
                    verifier_switches=Switches(routing=False, fusion=False), controller=False,
                    time_scale=0.05) as cluster:
        assert cluster.controller is None
        result = run_workload(cluster, 8, rate=100.0, max_new_tokens=16, domain_mix={"code": 1.0}, timeout=60)
    assert result["lossless"] and result["completed"] == 8
    assert result["mean_acceptance_length"] > 1.0


def test_a_verifier_admits_a_burst_a_few_requests_per_pass_not_all_at_once(redis_url):
    """A burst of arrivals is prefilled ``admit_per_tick`` at a time between verification passes (the rest,
    read in the same call, wait their turn), so requests in flight are not stalled for the whole burst."""
    from cosine.client import Client
    from cosine.service.verifier_service import VerifierSettings
    from cosine.sim.cluster import SimCluster

    cluster = SimCluster(redis_url, verifiers=1, drafters=1, controller=False, time_scale=0.01,
                         verifier_settings={"admit_per_tick": 2})
    cluster._build()  # the services, not their threads: the test turns the verifier's loop itself
    try:
        verifier = cluster.verifiers[0]
        verifier.heartbeat.beat()
        verifier.recover_own()
        with Client(settings=cluster.redis) as client:
            for i in range(5):
                client.submit([1 + i, 2, 3, 4], max_new_tokens=4)
        seen = []
        for _ in range(3):
            verifier.step()
            seen.append(verifier.metrics.counters["admitted"])
    finally:
        cluster.stop()
    assert seen == [2, 4, 5]
    with pytest.raises(InvalidParameterError, match="admit_per_tick"):
        VerifierSettings(worker_id="v", admit_per_tick=0)
