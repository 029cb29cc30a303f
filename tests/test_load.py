"""Open-loop overload (a real deployment): past saturation, submits are refused with OverloadedError while
the accepted requests keep completing, none is lost, and memory stays flat."""

from __future__ import annotations

import pytest

from cosine.load import markdown, run_load

pytestmark = pytest.mark.slow


def test_overload_is_refused_not_collapsed():
    report = run_load(multiples=(2.0, 5.0), seconds=8.0, max_new_tokens=16, max_outstanding=8)
    print("\n" + markdown(report))
    for name, level in report["levels"].items():
        assert level["lost"] == 0, name
        assert level["completed"] > 0 and level["latency_p99_s"] < 30, name
        assert level["memory_after"]["redis_mb"] < level["memory_before"]["redis_mb"] + 5, name
    five = report["levels"]["5x"]
    assert five["refused_share"] > 0.3, "past saturation most arrivals are refused at once"
    assert five["goodput_tok_s"] >= 0.3 * report["saturation_tok_s"], "back-pressure, not collapse"
