"""A bounded chaos run in CI: every fault kind at least once against a real deployment under load."""

from __future__ import annotations

import pytest

from cosine.chaos import FAULTS, ChaosConfig, markdown, run_chaos

pytestmark = pytest.mark.slow


def test_every_fault_kind_under_load_loses_nothing(tmp_path):
    report = run_chaos(ChaosConfig(seed=7, duration_s=40.0, fault_every_s=(2.0, 3.0), log_dir=str(tmp_path)),
                       progress=False)
    print("\n" + markdown(report))
    assert set(report["faults"]) == set(FAULTS), report["fault_log"]
    assert report["lost"] == 0, report["lost_reasons"]
    assert report["outputs"]["mismatched"] == 0 and report["outputs"]["compared"] == report["completed"]
    assert not report["worker_crashes"]
    assert report["completed"] >= 0.8 * report["requests"] > 0
    left = report["leftovers"]
    assert left["request_entries"] == 0 and left["held_by_verifiers"] == 0
    assert left["output_streams_without_expiry"] == 0
