"""Drafter placement: sticky while alive, least loaded otherwise, and the lead and peers of fusion across
drafter workers."""

from __future__ import annotations

from collections import Counter

from cosine.policy.placement import Placement


def test_a_request_keeps_its_worker_while_it_lives_else_goes_to_the_least_loaded_that_fits():
    p = Placement({"a": ["code"], "b": ["prose", "records"], "c": ["prose"]})
    assert p.drafter_for("a", [], Counter()) == "a"
    assert p.drafter_for("gone", [], Counter({"a": 3, "b": 1, "c": 1})) == "b"  # ties by name
    assert p.drafter_for(None, ["prose"], Counter({"b": 2})) == "c"
    assert p.drafter_for(None, ["records"], Counter({"b": 9})) == "b"
    assert p.drafter_for(None, ["nope"], Counter()) is None
    assert Placement({}).drafter_for("a", [], Counter()) is None


def test_heartbeats_and_the_pool_of_models():
    p = Placement.from_heartbeats({"a": {"experts": "code,prose"}, "b": {"experts": "records"}, "c": {}})
    assert p.hosted == {"a": ["code", "prose"], "b": ["records"], "c": []}
    assert p.pool("a") == ["code", "prose"] and p.pool("missing") == []
    p.cross_fusion = True
    assert p.pool("a") == ["code", "prose", "records"]


def test_fusion_across_workers_moves_the_lead_only_when_it_hosts_none_of_the_chosen_experts():
    p = Placement({"a": ["code"], "b": ["prose"], "c": ["prose", "records"]}, cross_fusion=True)
    assert p.lead_for("a", ["prose", "code"], Counter()) == "a"
    assert p.lead_for("a", ["prose"], Counter({"b": 2})) == "c"
    assert p.lead_for(None, ["prose"], Counter()) is None
    experts, weights, peers = p.peers_for("a", ["code", "prose", "records", "nowhere"], [1.0, 0.5, 0.4, 0.3],
                                          {"prose": "b"}, Counter({"b": 5}))
    assert peers == {"prose": "b", "records": "c"}, "a sticky peer stays while it hosts the expert"
    assert experts == ["code", "prose", "records"] and weights == [1.0, 0.5, 0.4], "an expert nobody hosts drops"
