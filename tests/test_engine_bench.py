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
        ["bench", "ablation", "--system", "cosine", "--system", "plain-dsd", "--concurrency", "1",
         "--open-requests", "2", "--rates", "2", "4", "--max-new-tokens", "8", "--cost-model",
         str(tmp_path / "cost.json"), "--out", str(tmp_path)],
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


def test_sim_bench_small(tmp_path):
    """The simulated cluster bench (fast clock): every output equals the simulated target's."""
    result = CliRunner().invoke(
        cli,
        ["bench", "sim", "--system", "cosine", "--system", "plain-dsd", "--drafters", "4", "--concurrency", "1",
         "--concurrency", "8", "--requests", "8", "--time-scale", "0.02", "--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    [js] = list(tmp_path.glob("sim-*.json"))
    payload = json.loads(js.read_text())
    assert all(r["lossless"] for r in payload["results"])
    assert {"throughput_c8", "lookahead_latency_c1"} <= set(payload["targets"])
