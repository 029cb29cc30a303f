"""Latency histograms: buckets, merging across workers, percentiles like Prometheus's histogram_quantile."""

from __future__ import annotations

import json

import pytest

from cosine.histogram import BOUNDS, Histogram, LatencyRecorder, from_wire, merged


def test_observations_land_in_their_bucket_and_the_overflow():
    h = Histogram((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 3.0):
        h.observe(v)
    assert h.counts == [2, 1, 1]  # le 1 holds 0.5 and 1.0 (bounds are inclusive, as Prometheus's le)
    assert h.total == pytest.approx(6.0)
    assert h.cumulative() == [("1.0", 2), ("2.0", 3), ("+Inf", 4)]


def test_quantile_is_linear_within_the_bucket():
    h = Histogram((1.0, 2.0, 4.0))
    for v in (0.5, 1.5, 1.5, 3.0):
        h.observe(v)
    assert h.quantile(0.5) == pytest.approx(1.5)  # rank 2 of 4: halfway through the (1, 2] bucket of 2
    assert h.quantile(1.0) == pytest.approx(4.0)
    assert Histogram((1.0,)).quantile(0.5) is None
    over = Histogram((1.0,))
    over.observe(9.0)
    assert over.quantile(0.99) == 1.0  # above the last bound: the last bound, as histogram_quantile says


def test_workers_histograms_add_up_and_bad_fields_are_skipped():
    a, b = LatencyRecorder(), LatencyRecorder()
    a.observe("ttft", 0.03)
    b.observe("ttft", 0.03)
    b.observe("e2e", 2.2)
    total = merged([a.wire(), b.wire(), None, "not json", json.dumps({"ttft": [1, 2]})])
    assert total["ttft"].count == 2 and total["e2e"].count == 1 and total["tpot"].count == 0
    assert total["ttft"].total == pytest.approx(0.06)
    assert from_wire("ttft", [0] * (len(BOUNDS["ttft"]) + 2)) is not None
    assert from_wire("nope", [0]) is None
