"""The verifier's pass trace: one JSON line per pass, cumulative counters reported as their growth."""

from __future__ import annotations

import json

from cosine.service.pass_trace import PassTrace


def test_lines_report_what_grew_since_the_previous_pass(tmp_path):
    path = tmp_path / "passes.jsonl"
    trace = PassTrace(str(path))
    trace.record({"admit_ms": 5.0, "slots_run": 10}, verified=2, depths=[3, 0])
    trace.record({"admit_ms": 5.0, "slots_run": 24}, verified=1, depths=[4])
    trace.close()
    first, second = [json.loads(line) for line in path.read_text().splitlines()]
    assert (first["verified"], first["depths"], first["admit_ms"], first["slots_run"]) == (2, [3, 0], 5.0, 10)
    assert (second["admit_ms"], second["slots_run"]) == (0.0, 14)
    assert second["t"] >= first["t"] > 0


def test_appends_to_an_existing_file(tmp_path):
    path = tmp_path / "passes.jsonl"
    path.write_text('{"earlier": true}\n')
    trace = PassTrace(str(path))
    trace.record({}, verified=1)
    trace.close()
    assert len(path.read_text().splitlines()) == 2
