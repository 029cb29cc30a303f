"""The command line explains itself and runs against the zoo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cosine.cli import cli


@pytest.mark.parametrize("args", [[], ["zoo"], ["zoo", "build"], ["bench", "engine"], ["demo"], ["generate"]])
def test_help(args):
    result = CliRunner().invoke(cli, args + ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output) > 200


def test_generate_json(zoo_root):
    result = CliRunner().invoke(cli, ["generate", "def main(", "--max-new-tokens", "12", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    assert out["finish_reason"] in ("stop", "length") and len(out["token_ids"]) <= 12
    assert out["stats"]["drafts"] >= 1


def test_bad_parameter_is_a_clean_error(zoo_root):
    proc = subprocess.run(
        [sys.executable, "-m", "cosine.cli", "generate", "x", "--top-p", "2"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "top_p" in proc.stderr and "Traceback" not in proc.stderr
