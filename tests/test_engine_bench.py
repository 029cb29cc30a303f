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
