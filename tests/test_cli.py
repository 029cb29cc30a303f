"""The command line explains itself and runs against the zoo."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from cosine.cli import cli


@pytest.mark.parametrize("args", [[], ["zoo"], ["zoo", "build"], ["bench", "engine"], ["demo"], ["generate"],
                                  ["worker"], ["worker", "drafter"], ["worker", "verifier"], ["up"], ["status"],
                                  ["controller"], ["profile"], ["bench", "ablation"], ["bench", "sim"]])
def test_help(args):
    result = CliRunner().invoke(cli, args + ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output) > 200


def test_bad_parameter_is_a_clean_error():
    proc = subprocess.run(
        [sys.executable, "-m", "cosine.cli", "generate", "x", "--top-p", "2"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "top_p" in proc.stderr and "Traceback" not in proc.stderr
