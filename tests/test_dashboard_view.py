"""The dashboard's state, computed from status snapshots without Redis or a browser: rates between samples,
speculation per position, drafter and domain, latency percentiles over the last minute, requests in flight."""

from __future__ import annotations

import json

import pytest

from cosine.dashboard.view import History, build_view
from cosine.histogram import LatencyRecorder


def snapshot(t: float, *, added: int, acked: int, passes: int, rounds: int, busy_s: float, tokens: int,
             completed: int, ttft: list[float], inflight: list[dict] | None = None, spec=(0, 0, 0)) -> dict:
    lat = LatencyRecorder()
    for v in ttft:
        lat.observe("ttft", v)
    drafts, draft_tokens, accepted = spec
    verifier = {
        "id": "verifier-0", "alive": True, "heartbeat_age_s": 0.2, "role": "verifier", "active": "2",
        "passes": str(passes), "spec_drafts": str(rounds), "plain_steps": "0", "busy_s": str(busy_s),
        "blocked_s": "0", "output_tokens": str(tokens), "completed": str(completed), "spec_draft_tokens":
        str(draft_tokens), "spec_accepted_tokens": str(accepted), "spec_accepted_pos_0": str(min(drafts, accepted)),
        "latency": lat.wire(), "inflight": json.dumps(inflight or []),
        "spec_by": json.dumps({"drafter": {"drafter-0": [drafts, draft_tokens, accepted]},
                               "domain": {"code": [drafts, draft_tokens, accepted]}}),
    }
    drafter = {"id": "drafter-0", "alive": True, "heartbeat_age_s": 0.1, "role": "drafter", "experts": "code,prose",
               "batches": str(passes), "jobs": str(2 * passes), "busy_s": str(busy_s / 2), "lookahead_hits": "3",
               "lookahead_misses": "1"}
    return {
        "redis": "redis://x", "prefix": "cosine", "now_ms": int(t * 1000), "dead_letters": 0,
        "workers": [verifier, drafter],
        "streams": [{"stream": "cosine:requests", "group": "verifiers", "consumers": 1, "pending": 2, "lag": 3,
                     "depth": 5, "oldest_waiting_age_s": 1.0, "oldest_pending_age_s": 4.0, "acked": acked,
                     "entries_added": added}],
        "control": {"version": "3", "k_min": "1", "k_max": "6", "max_cooperating": "2"},
        "timeline": [{"id": f"{int(t * 1000) - 500}-0", "kind": "change", "version": "3", "k_min": "1", "k_max": "6",
                      "reason": "queue grew"}],
    }


def test_rates_between_samples_and_worker_shares():
    h = History()
    build_view(snapshot(100.0, added=10, acked=5, passes=10, rounds=20, busy_s=1.0, tokens=100, completed=1,
                        ttft=[0.05]), [], h)
    view = build_view(snapshot(105.0, added=35, acked=25, passes=30, rounds=60, busy_s=3.5, tokens=600,
                               completed=6, ttft=[0.05]), [], h)
    [g] = view["streams"]
    assert g["enqueue_rate"] == pytest.approx(5.0) and g["ack_rate"] == pytest.approx(4.0)
    verifier, drafter = view["workers"]
    assert verifier["passes_per_s"] == pytest.approx(4.0)
    assert verifier["batch"] == pytest.approx(2.0)  # 40 request rounds over 20 passes
    assert verifier["busy"] == pytest.approx(0.5) and verifier["blocked"] == 0
    assert drafter["batch"] == pytest.approx(2.0) and drafter["models"] == "code,prose"
    assert view["requests"]["tokens_per_s"] == pytest.approx(100.0)
    assert view["requests"]["requests_per_s"] == pytest.approx(1.0)
    assert view["requests"]["in_flight"] == 2 and view["requests"]["queued"] == 3
    assert [p["t"] for p in view["series"]] == [100.0, 105.0]
    assert view["series"][-1]["requests_waiting"] == 3 and view["series"][-1]["k_max"] == 6
    assert view["decisions"][0]["reason"] == "queue grew" and view["decisions"][0]["t"] == pytest.approx(104.5)


def test_a_restarted_worker_gives_no_negative_rate():
    h = History()
    build_view(snapshot(10.0, added=50, acked=50, passes=100, rounds=100, busy_s=9.0, tokens=900, completed=9,
                        ttft=[]), [], h)
    view = build_view(snapshot(16.0, added=52, acked=51, passes=3, rounds=3, busy_s=0.2, tokens=10, completed=0,
                               ttft=[]), [], h)
    assert view["workers"][0]["passes_per_s"] == 0 and view["workers"][0]["busy"] == 0
    assert view["requests"]["tokens_per_s"] == 0


def test_speculation_panels():
    view = build_view(snapshot(1.0, added=1, acked=1, passes=4, rounds=10, busy_s=0, tokens=0, completed=0,
                               ttft=[], spec=(10, 40, 20)), [], History())
    spec = view["speculation"]
    assert spec["overall"]["acceptance_rate"] == pytest.approx(0.5)
    assert spec["overall"]["mean_acceptance_length"] == pytest.approx(3.0)  # 1 + 20 accepted / 10 drafts
    assert spec["by_drafter"]["drafter-0"]["accepted"] == 20 and spec["by_domain"]["code"]["drafts"] == 10
    assert spec["per_position"] == [{"position": 0, "accepted": 10, "rate": 1.0}]
    assert spec["k"] == "1..6" and spec["cooperating"] == "2"
    assert spec["lookahead_hit_rate"] == pytest.approx(0.75)
    assert spec["recent"] is None  # one sample: nothing to difference yet


def test_recent_latency_leaves_out_what_is_older_than_a_minute():
    h = History()
    build_view(snapshot(10.0, added=0, acked=0, passes=0, rounds=0, busy_s=0, tokens=0, completed=0,
                        ttft=[5.0, 5.0]), [], h)
    view = build_view(snapshot(80.0, added=0, acked=0, passes=0, rounds=0, busy_s=0, tokens=0, completed=0,
                               ttft=[5.0, 5.0, 0.03]), [], h)
    ttft = view["requests"]["latency"]["ttft"]
    assert ttft["all"]["count"] == 3 and ttft["recent"]["count"] == 1
    assert 0.02 < ttft["recent"]["p50"] <= 0.04 and ttft["all"]["p99"] > 2.5


def test_requests_in_flight_oldest_first_with_their_verifier():
    rows = [{"id": "a", "client": "c1", "tokens": 3, "max": 10, "age_s": 1.0, "drafter": "drafter-0"},
            {"id": "b", "client": "c2", "tokens": 9, "max": 10, "age_s": 7.5, "drafter": ""}]
    view = build_view(snapshot(1.0, added=0, acked=0, passes=0, rounds=0, busy_s=0, tokens=0, completed=0, ttft=[],
                               inflight=rows), [], History())
    assert [(r["id"], r["verifier"]) for r in view["requests"]["inflight"]] == [("b", "verifier-0"),
                                                                                 ("a", "verifier-0")]
