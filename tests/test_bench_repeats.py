"""Head-to-head repeats: run order, pooling, and the targets computed from them."""

import pytest

from cosine.bench.ablation import AblationConfig, ablation_markdown, ablation_targets
from cosine.bench.repeats import alternated, pooled, ratio_interval, rivals, run_repeats
from cosine.errors import InvalidParameterError

C8, FL = "closed c=8", "poisson fluctuating"


def cell(system, workload, tp, p99, tokens=100):
    return {"system": system, "workload": workload, "throughput_tok_s": tp, "tpot_p99_ms": p99, "tokens": tokens,
            "mean_acceptance_length": 2.0}


def test_alternated_order_puts_each_system_first_in_turn():
    assert alternated(["a", "b"], 3) == [(0, "a"), (0, "b"), (1, "b"), (1, "a"), (2, "a"), (2, "b")]
    assert alternated(["a", "b", "c"], 2) == [(0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a")]
    assert alternated(["a", "b"], 0) == []
    with pytest.raises(InvalidParameterError, match="repeats"):
        alternated(["a", "b"], -1)


def test_pooled_sums_tokens_and_wall_and_takes_percentiles_over_every_request():
    rows = [{"tokens": 100, "wall_s": 1.0, "requests": 2, "throughput_tok_s": 100.0, "tpot_p99_ms": 30.0,
             "tpots_ms": [10.0, 30.0]},
            {"tokens": 300, "wall_s": 3.0, "requests": 3, "throughput_tok_s": 100.0, "tpot_p99_ms": 50.0,
             "tpots_ms": [20.0, 40.0, 50.0]}]
    p = pooled(rows)
    assert p["throughput_tok_s"] == 100.0 and p["runs"] == 2 and p["requests"] == 5
    assert p["tpot_p50_ms"] == 30.0 and p["tpot_p99_ms"] == 50.0
    # a mean of the runs' ratios would weigh the short run as much as the long one
    rows[1]["wall_s"] = 1.0
    assert pooled(rows)["throughput_tok_s"] == 200.0


def test_rivals_are_plain_dsd_at_c8_and_the_sweeps_two_lowest_p99_fixed_lengths():
    results = [cell("cosine", C8, 200, 50), cell("plain-dsd", C8, 150, 70), cell("cosine", FL, 149, 100),
               cell("no-adaptive", FL, 149, 110), cell("fixed-k6", FL, 148, 95), cell("fixed-k8", FL, 150, 140)]
    assert rivals(results) == [(C8, "cosine", "plain-dsd"), (FL, "cosine", "fixed-k6"), (FL, "cosine", "no-adaptive")]
    assert rivals([r for r in results if r["workload"] == FL]) == [(FL, "cosine", "fixed-k6"),
                                                                  (FL, "cosine", "no-adaptive")]


def test_targets_use_the_pooled_repeats_where_both_systems_have_them():
    results = [cell("cosine", C8, 200, 50), cell("plain-dsd", C8, 160, 70),  # sweep: 1.25x, missed
               cell("cosine", FL, 149, 100), cell("fixed-k6", FL, 150, 95), cell("fixed-k2", FL, 151, 120)]
    cfg = AblationConfig()
    sweep = ablation_targets(results, cfg)
    assert sweep["throughput_c8"]["value"] == 1.25 and not sweep["throughput_c8"]["met"]
    assert "sweep" in sweep["throughput_c8"]["what"]
    # without repeats the adaptive target takes the best fixed length per metric: k2's throughput, k6's p99
    assert sweep["adaptive_fluctuating"]["value"] == f"{round(149 / 151, 3)}x throughput, {round(100 / 95, 3)}x p99"

    p99s = {"cosine": 90.0, "fixed-k6": 95.0, "fixed-k2": 92.0}  # nearly every request's per-token latency

    def measure(system, workload, r):
        tp = {("cosine", C8): 210.0, ("plain-dsd", C8): 150.0, ("cosine", FL): 152.0, ("fixed-k6", FL): 150.0,
              ("fixed-k2", FL): 151.0}
        tpots = [p99s.get(system, 95.0)] * 99 + [120.0]
        t = tp[(system, workload)]
        return {"tokens": int(t * 10), "wall_s": 10.0, "requests": 100, "throughput_tok_s": t,
                "tpot_p99_ms": max(tpots), "tpots_ms": tpots}

    repeats = run_repeats(rivals(results), 2, measure)
    assert [(r["system"], r["repeat"]) for r in repeats if r["workload"] == C8] == [
        ("cosine", 0), ("plain-dsd", 0), ("plain-dsd", 1), ("cosine", 1)]
    # CoSine runs once per repeat against both fixed lengths, the three alternated together
    assert [(r["system"], r["repeat"]) for r in repeats if r["workload"] == FL] == [
        ("cosine", 0), ("fixed-k6", 0), ("fixed-k2", 0), ("fixed-k2", 1), ("fixed-k6", 1), ("cosine", 1)]
    t = ablation_targets(results, cfg, repeats)
    assert t["throughput_c8"]["value"] == 1.4 and t["throughput_c8"]["met"]
    assert "2 alternated runs each" in t["throughput_c8"]["what"]
    adaptive = t["adaptive_fluctuating"]
    assert adaptive["met"] and "fixed-k6 and fixed-k2" in adaptive["what"]
    assert adaptive["value"] == (f"{round(152 / 150, 3)}x throughput, {round(90 / 95, 3)}x p99 (fixed-k6); "
                                 f"{round(152 / 151, 3)}x throughput, {round(90 / 92, 3)}x p99 (fixed-k2)")
    # Beating one of the two is not enough.
    p99s["fixed-k2"] = 88.0
    assert not ablation_targets(results, cfg, run_repeats(rivals(results), 2, measure))["adaptive_fluctuating"]["met"]
    md = ablation_markdown({"environment": {"git_sha": "x", "time": "t"}, "config": {}, "results": results,
                            "repeats": repeats, "targets": t}, note=False)
    assert "Head-to-head repeats" in md and "| closed c=8 | cosine | 2 | 210, 210 | 210 |" in md


def run(repeat, tp, tpots):
    return {"repeat": repeat, "tokens": int(tp * 10), "wall_s": 10.0, "requests": len(tpots),
            "throughput_tok_s": tp, "tpot_p99_ms": max(tpots), "tpots_ms": tpots}


def test_ratio_interval_resamples_repeats_paired_and_brackets_the_pooled_ratio():
    a = [run(0, 110.0, [10.0] * 50), run(1, 90.0, [30.0] * 50), run(2, 100.0, [20.0] * 50)]
    b = [run(0, 100.0, [20.0] * 50), run(1, 100.0, [20.0] * 50), run(2, 100.0, [20.0] * 50)]
    iv = ratio_interval(a, b)
    lo, hi = iv["throughput_tok_s"]
    assert 0.9 <= lo < 1.0 < hi <= 1.1  # the pooled ratio, 1.0, inside; no draw beyond the extreme runs
    assert iv["tpot_p99_ms"][0] <= 1.0 and iv["tpot_p99_ms"][1] == 1.5  # run 1 (p99 30 ms) in most draws
    assert ratio_interval(a, b) == iv  # a fixed seed: the same rows, the same interval
    # identical systems: no spread at all, whatever the draws
    assert ratio_interval(b, b) == {"throughput_tok_s": (1.0, 1.0), "tpot_p99_ms": (1.0, 1.0)}
    # only the repeats both systems ran count; fewer than two give no interval
    assert ratio_interval(a[:1], b) is None and ratio_interval(a, b[2:]) is None
    with pytest.raises(InvalidParameterError, match="level"):
        ratio_interval(a, b, level=1.0)


def test_targets_carry_the_repeats_interval_into_the_table():
    results = [cell("cosine", C8, 200, 50), cell("plain-dsd", C8, 150, 70)]
    pairs = [(210.0, 150.0), (190.0, 150.0)]  # repeat r: (cosine, plain-dsd) tokens/s
    repeats = [{"system": s, "workload": C8, **run(r, tp, [20.0] * 10)}
               for r, (x, y) in enumerate(pairs) for s, tp in (("cosine", x), ("plain-dsd", y))]
    t = ablation_targets(results, AblationConfig(), repeats)
    assert t["throughput_c8"]["interval"] == "1.27–1.40"
    assert ablation_targets(results, AblationConfig())["throughput_c8"]["interval"] == "—"
    md = ablation_markdown({"environment": {"git_sha": "x", "time": "t"}, "config": {}, "results": results,
                            "repeats": repeats, "targets": t}, note=False)
    assert "90% interval over the repeats" in md and "| 1.27–1.40 |" in md
