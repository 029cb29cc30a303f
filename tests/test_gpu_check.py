"""`cosine bench gpu` in its quick mode runs on a CPU, writes its JSON and markdown, and finds the engine exact."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from cosine.bench.gpu_check import run_gpu_check
from cosine.cli import cli


def test_quick_gpu_check_on_cpu(tmp_path, zoo_root):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and immune to a busy neighbour core
    try:
        payload = run_gpu_check("cpu", "float32", tmp_path, quick=True, progress=False)
    finally:
        torch.set_num_threads(threads)
    rows = payload["results"]
    assert [r["model"] for r in rows] == ["zoo target", "llama3-8b-shaped (2 layers)", "qwen2.5-7b-shaped (2 layers)"]
    for r in rows:
        assert "error" not in r, r
        assert [d["batch"] for d in r["decode"]] == [1, 8]
        for d in r["decode"]:
            assert d["engine_tokens_per_s"] > 0 and d["hf_tokens_per_s"] > 0
        assert r["exact"] is True and r["first_divergence"] is None, r["model"]
        assert r["speculative_exact"] is True, r["model"]  # drafted by an expert of its family
        v = r["verify_pass"]
        assert set(v["ms"]) == {"1", "5", "9"} and v["q9_over_q1"] > 0
        assert v["syncs_per_pass"] is None and v["outside_kernels_share"] is None and r["peak_gib"] is None
    assert payload["environment"]["device_name"] and payload["environment"]["git_sha"]
    assert json.loads((tmp_path / "gpu-check.json").read_text())["results"] == rows
    md = (tmp_path / "gpu-check.md").read_text()
    assert md.startswith("| model | batch | engine tok/s") and md.count("| zoo target |") == 2


def test_gpu_command_help():
    result = CliRunner().invoke(cli, ["bench", "gpu", "--help"])
    assert result.exit_code == 0, result.output
    assert "--quick" in result.output and "--device" in result.output
