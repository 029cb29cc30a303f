"""CoSine against the Hugging Face baselines: ratios per view, the issue's targets (from the sweep's cells
or the pooled repeats), the physical limit, and how output comparisons read. No timings."""

from __future__ import annotations

from cosine.bench.hf_baselines import match_cell
from cosine.bench.pinning import EQUAL, NODE
from cosine.bench.versus import add_limits, hf_targets, rivals, versus


def test_match_cells_name_near_ties_and_flag_real_mismatches():
    assert match_cell({"reference": True}) == "reference" and match_cell(None) == "—"
    assert match_cell({"compared": 4, "identical": 4, "near_ties": [], "mismatches": []}) == "4/4"
    tie = {"prompt": 1, "position": 3, "logit_gap": 1e-5}
    assert match_cell({"compared": 4, "identical": 3, "near_ties": [tie], "mismatches": []}) == "3/4 (1 near-tie)"
    assert "mismatched" in match_cell({"compared": 4, "identical": 3, "near_ties": [], "mismatches": [tie]})


def row(system, workload, tp, **extra):
    return {"system": system, "workload": workload, "throughput_tok_s": tp, "tokens": 100, "wall_s": 100 / tp,
            "requests": 2, "tpot_p99_ms": 10.0, "tpots_ms": [10.0], **extra}


def sweep():
    c1, c8 = "closed c=1", "closed c=8"
    return [row("cosine", c1, 150, mean_acceptance_length=3.0, tpot_p50_ms=8.0,
                verifier_pass={"blocked_on_drafts": 0.05}),
            row("cosine", c8, 600, mean_acceptance_length=2.0, tpot_p50_ms=16.0),
            row(f"hf-generate ({NODE})", c1, 100, tpot_p50_ms=10.0), row(f"hf-assisted ({NODE})", c1, 120),
            row(f"hf-batched ({NODE})", c8, 400), row(f"hf-generate ({EQUAL})", c1, 125),
            row(f"hf-batched ({EQUAL})", c8, 700)]


def test_ratios_and_targets_per_view_from_the_sweeps_cells():
    results, both = sweep(), (NODE, EQUAL)
    t = hf_targets(results, None, "cosine", both)
    assert t["node_c1_vs_hf_generate"]["value"] == 1.5 and t["node_c1_vs_hf_generate"]["met"]
    assert t["node_c1_vs_hf_assisted"]["value"] == 1.25 and t["node_c8_vs_hf_batched"]["value"] == 1.5
    assert t["equal_c1_vs_hf_generate"]["value"] == 1.2 and not t["equal_c8_vs_hf_batched"]["met"]
    assert t["verifier_blocked_c1"]["value"] == 0.05 and t["verifier_blocked_c1"]["met"]
    assert all(v["view"] in both for v in t.values()) and "the sweep's cells" in t["node_c1_vs_hf_generate"]["what"]
    assert set(hf_targets(results, None, "cosine", (EQUAL,))) == {"equal_c1_vs_hf_generate", "equal_c8_vs_hf_batched",
                                                                 "verifier_blocked_c1"}
    v = versus(results, "cosine", both, (1, 8))
    assert v[NODE]["closed c=8"] == {"tok_s": 600, "vs hf-generate": 6.0, "vs hf-batched": 1.5}
    assert v[NODE]["closed c=1"]["vs hf-assisted"] == 1.25 and "vs hf-batched" not in v[NODE]["closed c=1"]
    assert sorted(rivals(results, "cosine", both)) == sorted([
        ("closed c=1", "cosine", f"hf-generate ({NODE})"), ("closed c=1", "cosine", f"hf-assisted ({NODE})"),
        ("closed c=8", "cosine", f"hf-batched ({NODE})"), ("closed c=1", "cosine", f"hf-generate ({EQUAL})"),
        ("closed c=8", "cosine", f"hf-batched ({EQUAL})")])


def test_targets_pool_the_alternated_repeats_where_both_systems_ran():
    repeats = [{**row(s, "closed c=1", tp), "repeat": r} for r in range(2)
               for s, tp in (("cosine", 200), (f"hf-generate ({NODE})", 100))]
    t = hf_targets(sweep(), repeats, "cosine", (NODE,))
    assert t["node_c1_vs_hf_generate"]["value"] == 2.0 and t["node_c1_vs_hf_generate"]["interval"] == "2.00–2.00"
    assert "2 alternated runs each" in t["node_c1_vs_hf_generate"]["what"]
    assert t["node_c1_vs_hf_assisted"]["value"] == 1.25  # not repeated: the sweep's cells


def test_the_physical_limit_is_acceptance_times_hf_decode_rate_on_the_verifiers_cores():
    results = sweep()
    where = add_limits(results, ["cosine"], (NODE, EQUAL))
    assert where == {"hf_decode_tok_s": 100.0, "from": f"hf-generate ({NODE})"}
    c1 = results[0]["limit"]
    assert c1 == {"tok_s": 300.0, "per_request_tok_s": 125.0, "of_limit": round(125 / 300, 3)}
    assert results[1]["limit"]["tok_s"] == 200.0 and "limit" not in results[2]
    assert add_limits([r for r in sweep() if "hf-generate" not in r["system"]], ["cosine"], (NODE,)) is None
