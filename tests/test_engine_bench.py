"""`cosine bench engine` runs end to end (tiny settings) and writes JSON and markdown."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cosine.cli import cli


@pytest.mark.slow
def test_engine_bench_small(tmp_path, zoo_root):
    result = CliRunner().invoke(
        cli,
        ["bench", "engine", "--prompts-per-domain", "1", "--max-new-tokens", "8", "--batch", "1", "--batch", "2",
         "--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    [js] = list(tmp_path.glob("engine-*.json"))
    payload = json.loads(js.read_text())
    names = {r["path"] for r in payload["results"]}
    assert {"HF generate (target only)", "HF assisted generation", "engine target-only"} <= names
    assert payload["environment"]["git_sha"] and payload["config"]["prompts"] == 3
    for r in payload["results"]:
        assert r["tokens_per_s"] > 0
        if r["identical_to_target_only"]:
            done, total = map(int, r["identical_to_target_only"].split("/"))
            assert done == total


@pytest.mark.slow
def test_ablation_bench_small(tmp_path, zoo_root):
    """Two systems, one closed-loop level and a short open loop: rows, targets and the tables come out; the
    payload records the cost model given to the verifiers."""
    from cosine.policy.cost_model import CostModel

    cost = CostModel.default()
    cost.verify_base_ms = 9.5
    cost.save(tmp_path / "cost.json")
    result = CliRunner().invoke(
        cli,
        ["bench", "ablation", "--system", "cosine", "--system", "plain-dsd", "--system", "hf-generate",
         "--concurrency", "1", "--open-requests", "2", "--fluctuating-requests", "4", "--rates", "2", "4",
         "--max-new-tokens", "8", "--cost-model",
         str(tmp_path / "cost.json"), "--repeats", "1", "--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    [js] = list(tmp_path.glob("ablation-*.json"))
    payload = json.loads(js.read_text())
    assert payload["cost_model"]["verify_ms"]["verify_base_ms"] == 9.5
    assert payload["config"]["cost_model"] == str(tmp_path / "cost.json")
    assert {(r["system"], r["workload"]) for r in payload["results"]} >= {("cosine", "closed c=1"),
                                                                         ("plain-dsd", "poisson fluctuating")}
    assert all(r["tokens"] == 8 * r["requests"] for r in payload["results"])
    assert "lookahead_latency_c1" in payload["targets"] and "Mean acceptance length" in result.output
    # the baseline in each view, CoSine's breakdown per row, the targets against it from the alternated repeats
    views = payload["config"]["views"]
    assert {(f"hf-generate ({v})", "closed c=1") for v in views} <= {(r["system"], r["workload"])
                                                                    for r in payload["results"]}
    assert all(r["verifier_pass"] for r in payload["results"] if r["system"] in ("cosine", "plain-dsd"))
    target = "node_c1_vs_hf_generate" if "node-emulated" in views else "equal_c1_vs_hf_generate"
    assert "1 alternated runs each" in payload["targets"][target]["what"]
    assert {r["system"] for r in payload["repeats"]} >= {"cosine", f"hf-generate ({views[0]})"}
    assert "CoSine against Hugging Face" in result.output and "Verifier time" in result.output


@pytest.mark.slow
def test_e2e_bench_small(tmp_path, zoo_root):
    """A tiny run of every system, pinned as by default: the JSON's shape, the placement the OS reports for
    each process, the breakdown and limit per pipeline row, and every output checked against the target's."""
    from cosine.bench.e2e_bench import E2EBenchConfig, run_e2e_bench
    from cosine.bench.e2e_report import e2e_markdown, e2e_plots
    from cosine.bench.pinning import allowed_cpus

    cfg = E2EBenchConfig(concurrency=(1, 2), requests_per_client=1, min_requests=2, max_new_tokens=6, repeats=1)
    payload = run_e2e_bench(cfg, progress=False)
    json.dumps(payload)
    assert {"environment", "config", "placement", "physical_limit", "results", "repeats", "versus",
            "targets"} <= set(payload)
    views = payload["config"]["views"]
    pinned = len(allowed_cpus()) >= 2
    assert views == (["node-emulated", "equal compute"] if pinned else ["equal compute"])
    if pinned:  # verifier on the first core; drafter, controller, Redis and the client on the second
        first, second = (str(c) for c in sorted(allowed_cpus())[:2])
        assert payload["placement"] == {"verifier-0": first, "drafter-0": second, "controller-0": second,
                                        "redis": second, "client": second}
    cells = {(r["system"], r["concurrency"]) for r in payload["results"]}
    for view in views:
        assert {(f"hf-generate ({view})", 1), (f"hf-assisted ({view})", 1), (f"hf-batched ({view})", 2)} <= cells
    assert {("pipeline", 1), ("pipeline", 2), ("target-only", 2), ("coupled", 1)} <= cells
    for r in payload["results"]:
        assert r["tokens"] == 6 * r["requests"]
        match = r["output_match"]
        if not match.get("reference"):  # greedy: the same tokens as the target alone, near-ties named
            assert match["compared"] == 2 and not match["mismatches"], (r["system"], match)
        if r["system"] == "pipeline":
            assert set(r["verifier_pass"]) >= {"forward", "blocked_on_drafts", "messaging", "overhead", "idle"}
            assert r["limit"]["tok_s"] > 0
    assert [r for r in payload["results"] if r["output_match"].get("reference")][0]["system"] == \
        f"hf-generate ({views[0]})"
    assert payload["physical_limit"]["from"] == f"hf-generate ({views[0]})"
    assert set(payload["versus"]) == set(views) and "vs hf-batched" in payload["versus"][views[0]]["closed c=2"]
    prefix = "node" if pinned else "equal"
    assert {f"{prefix}_c1_vs_hf_generate", "verifier_blocked_c1"} <= set(payload["targets"])
    assert {r["system"] for r in payload["repeats"]} >= {"pipeline", f"hf-generate ({views[0]})"}
    md = e2e_markdown(payload)
    assert "CoSine against Hugging Face, **" + views[0] in md and "same output as the target alone" in md
    e2e_plots(payload, str(tmp_path / "e2e.png"))
    assert (tmp_path / "e2e.png").stat().st_size > 0


def test_sim_bench_small(tmp_path):
    """The simulated cluster bench (fast clock): every output equals the simulated target's."""
    result = CliRunner().invoke(
        cli,
        ["bench", "sim", "--system", "cosine", "--system", "plain-dsd", "--drafters", "4", "--concurrency", "1",
         "--concurrency", "8", "--requests", "8", "--rates", "16", "64", "--repeats", "1", "--time-scale", "0.02",
         "--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    [js] = list(tmp_path.glob("sim-*.json"))
    payload = json.loads(js.read_text())
    assert all(r["lossless"] for r in payload["results"])
    assert {"throughput_c8", "lookahead_latency_c1"} <= set(payload["targets"])
