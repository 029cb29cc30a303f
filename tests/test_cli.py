"""The command line explains itself and runs against the zoo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from cosine.cli import cli


@pytest.mark.parametrize("args", [[], ["zoo"], ["zoo", "build"], ["bench", "engine"], ["demo"], ["generate"],
                                  ["worker"], ["worker", "drafter"], ["worker", "verifier"], ["up"], ["status"],
                                  ["controller"], ["profile"], ["bench", "ablation"], ["bench", "sim"],
                                  ["bench", "e2e"]])
def test_help(args):
    result = CliRunner().invoke(cli, args + ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output) > 200


def test_the_e2e_paths_the_cli_offers_are_the_benchmarks():
    from cosine.bench.e2e_bench import PATHS
    from cosine.cli_bench import E2E_PATHS

    assert E2E_PATHS == PATHS


def test_bad_parameter_is_a_clean_error():
    proc = subprocess.run(
        [sys.executable, "-m", "cosine.cli", "generate", "x", "--top-p", "2"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "top_p" in proc.stderr and "Traceback" not in proc.stderr


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of the processes whose parent is ``pid``."""
    out = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if int(rest[1]) == pid:
            out.append((int(d), name))
    return out


@pytest.mark.slow
def test_sigterm_to_a_benchmark_stops_the_deployment_it_started(tmp_path):
    """Python dies at once on SIGTERM by default; the benchmark must instead stop its workers and Redis."""
    with (tmp_path / "log").open("w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "cosine.cli", "bench", "ablation", "--system", "plain-dsd",
                                 "--repeats", "0", "--out", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=log)
    started: list[tuple[int, str]] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(_children(proc.pid)) < 3:  # Redis, verifier, drafter
            assert proc.poll() is None, (tmp_path / "log").read_text()[-2000:]
            time.sleep(0.2)
        started = _children(proc.pid)
        assert any("redis" in name for _, name in started) and len(started) >= 3, started
        time.sleep(2)  # the workers are loading their models or serving the warm-up
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        left = [(pid, name) for pid, name in started if os.path.exists(f"/proc/{pid}")]
        assert not left, f"left running after SIGTERM: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid, _ in started:  # what a failure left behind
            if os.path.exists(f"/proc/{pid}"):
                os.kill(pid, signal.SIGKILL)
