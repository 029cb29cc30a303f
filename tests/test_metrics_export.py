"""Prometheus metrics (cosine/metrics_export.py): the translation of a status snapshot into metric families,
unit-tested on fake snapshots, and the exposition of a live deployment checked against Redis read directly."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import redis
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cosine.broker import RedisSettings
from cosine.histogram import LatencyRecorder
from cosine.keys import VERIFIERS_GROUP, Keys
from cosine.metrics_export import (
    CONTROL_GAUGES,
    CONTROLLER_COUNTERS,
    DRAFTER_COUNTERS,
    STREAM_COUNTERS,
    STREAM_GAUGES,
    VERIFIER_COUNTERS,
    VERIFIER_GAUGES,
    WORKER_GAUGES,
    DeploymentCollector,
    build_registry,
    families_from_status,
    render,
)

from .pipeline_helpers import heartbeat_until, wait_for

DOCS = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"


def parse(body: bytes | str) -> dict:
    text = body.decode() if isinstance(body, bytes) else body
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, name: str, sample: str | None = None, **labels) -> float:
    """The one sample of family ``name`` (named ``sample``, when given) whose labels include ``labels``."""
    found = [s.value for s in fams[name].samples
             if not s.name.endswith("_created") and (sample is None or s.name == sample)
             and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, fams[name].samples)
    return found[0]


def fake_status(**over) -> dict:
    verifier = {
        "id": "verifier-0", "heartbeat_age_s": 0.25, "alive": True, "role": "verifier", "active": "3",
        "capacity": "32", "rounds": "11", "completed": "3", "busy": "0.5401", "uptime_s": "2.032",
        "busy_s": "1.0974", "admit_s": "0.3137", "messaging_s": "0.0784", "blocked_s": "0.7592",
        "draft_wait_s": "0.082", "scheduling_s": "0.0095", "draft_budget_ms": "472.0", "draft_rtt_p50_ms": "148",
        "control_version": "4", "slots_run": "156", "slots_fed": "152", "kv_bytes": "0",
        "kv_peak_bytes": "4718592", "kv_capacity_tokens": "", "waiting": "1", "rss_peak_bytes": "520470528",
        "draft_jobs": "17", "draft_positions": "55", "admitted": "3", "passes": "11", "pass_tokens": "82",
        "bets_taken": "4", "lookahead_hits": "4", "stale_drafts": "11", "late_drafts": "2", "plain_steps": "5",
        "finish_length": "2", "finish_stop": "1", "pid": "21617",
    }
    drafter = {
        "id": "drafter-0", "heartbeat_age_s": 0.37, "alive": True, "role": "drafter",
        "experts": "code,prose,records", "tokenizer": "85122f8b2773fd74", "tokens": "4096",
        "memory": "code@cpu=4.9MiB", "active": "0", "jobs": "17", "batches": "13", "resyncs": "1",
        "lookahead_hits": "4", "lookahead_misses": "2", "bets_sent": "30", "busy": "0.5003", "busy_s": "0.7689",
        "lookahead_s": "0.3987", "votes_served": "0", "vote_rounds": "0", "vote_asks": "0", "vote_wait_s": "0.0",
        "vote_timeouts": "0", "vote_resyncs": "0", "lookahead_missed_bonus": "1", "lookahead_missed_other": "1",
    }
    controller = {"id": "controller-0", "heartbeat_age_s": 0.1, "alive": True, "role": "controller",
                  "state": "active", "version": "4", "decisions": "4", "interval_ms": "500", "active": "0"}
    gone = {"id": "verifier-1", "heartbeat_age_s": 9.5, "alive": False}  # its hash expired: only the zset entry
    snap = {
        "redis": "redis://127.0.0.1:1/0", "prefix": "pfx",
        "workers": [verifier, drafter, controller, gone],
        "streams": [
            {"stream": "pfx:requests", "group": "verifiers", "consumers": 1, "pending": 3, "lag": 2, "depth": 5},
            {"stream": "pfx:draft:drafter-0", "group": "drafters", "consumers": 1, "pending": 0, "lag": None,
             "depth": 4},
        ],
        "dead_letters": 2,
        "control": {"version": "4", "k_min": "1", "k_max": "6", "max_cooperating": "2", "verifier_max_batch": "16",
                    "verifier_token_cap": "512", "pressure": "0.25", "reason": "calm", "controller": "controller-0",
                    "at_ms": "1", "schema": "1", "age_s": 1.5},
        "timeline": [],
    }
    snap.update(over)
    return snap


def exposition(snap: dict) -> dict:
    return parse(generate_latest(build_registry(RedisSettings(), status=lambda _settings: snap)))


# -- the translation, without Redis -------------------------------------------------------------------------
def test_types_values_and_labels_of_a_snapshot():
    fams = exposition(fake_status())
    assert value(fams, "cosine_redis_up") == 1
    assert fams["cosine_spec_decode_num_drafts"].type == "counter"
    assert value(fams, "cosine_spec_decode_num_drafts", worker="verifier-0") == 17  # draft_jobs
    assert value(fams, "cosine_spec_decode_num_draft_tokens", worker="verifier-0") == 55  # draft_positions
    assert fams["cosine_spec_decode_num_drafts"].samples[0].name == "cosine_spec_decode_num_drafts_total"
    assert "cosine_spec_decode_num_accepted_tokens" not in fams  # not published: absent, not 0
    assert "cosine_spec_decode_num_accepted_tokens_per_pos" not in fams

    assert fams["cosine_stream_waiting"].type == "gauge"
    req = {"stream": "pfx:requests", "group": "verifiers", "kind": "requests"}
    assert value(fams, "cosine_stream_waiting", **req) == 2
    assert value(fams, "cosine_stream_pending", **req) == 3
    assert value(fams, "cosine_stream_depth", **req) == 5
    assert value(fams, "cosine_stream_consumers", **req) == 1
    drafts = {"stream": "pfx:draft:drafter-0", "kind": "draft", "group": "drafters"}
    assert value(fams, "cosine_stream_depth", **drafts) == 4
    assert not [s for s in fams["cosine_stream_waiting"].samples if s.labels["kind"] == "draft"]  # lag unknown
    assert value(fams, "cosine_dead_letters") == 2

    assert value(fams, "cosine_worker_up", role="verifier", worker="verifier-0") == 1
    assert value(fams, "cosine_worker_up", role="unknown", worker="verifier-1") == 0
    assert value(fams, "cosine_worker_heartbeat_age_seconds", worker="verifier-1") == 9.5
    assert value(fams, "cosine_worker_busy_ratio", role="drafter", worker="drafter-0") == pytest.approx(0.5003)
    assert value(fams, "cosine_worker_active_requests", role="verifier", worker="verifier-0") == 3
    assert value(fams, "cosine_worker_kv_peak_bytes", role="verifier", worker="verifier-0") == 4718592
    assert "cosine_worker_kv_capacity_tokens" not in fams  # "" = no budget
    assert value(fams, "cosine_worker_control_version", role="verifier", worker="verifier-0") == 4
    assert value(fams, "cosine_worker_control_version", role="controller", worker="controller-0") == 4
    assert value(fams, "cosine_verifier_draft_budget_seconds", worker="verifier-0") == pytest.approx(0.472)
    assert value(fams, "cosine_verifier_waiting_requests", worker="verifier-0") == 1

    assert value(fams, "cosine_verifier_rounds", worker="verifier-0") == 11
    assert value(fams, "cosine_verifier_forward_seconds", worker="verifier-0") == pytest.approx(1.0974)
    assert value(fams, "cosine_verifier_stale_drafts", worker="verifier-0") == 11
    assert value(fams, "cosine_verifier_late_drafts", worker="verifier-0") == 2
    assert value(fams, "cosine_verifier_plain_steps", worker="verifier-0") == 5
    assert value(fams, "cosine_verifier_lookahead_hits", worker="verifier-0") == 4
    assert value(fams, "cosine_verifier_finished_requests", worker="verifier-0", reason="length") == 2
    assert value(fams, "cosine_verifier_finished_requests", worker="verifier-0", reason="stop") == 1
    assert value(fams, "cosine_drafter_resyncs", worker="drafter-0") == 1  # not the verifier's resyncs
    assert value(fams, "cosine_drafter_lookahead_misses", worker="drafter-0") == 2
    assert value(fams, "cosine_drafter_lookahead_missed", worker="drafter-0", kind="bonus") == 1
    assert value(fams, "cosine_controller_leader", worker="controller-0") == 1
    assert value(fams, "cosine_controller_decisions", worker="controller-0") == 4

    assert value(fams, "cosine_control_version") == 4
    assert value(fams, "cosine_control_k_max") == 6
    assert value(fams, "cosine_control_pressure") == 0.25
    assert value(fams, "cosine_control_age_seconds") == 1.5
    assert all(f.documentation for f in fams.values())


def test_spec_fields_when_verifiers_publish_them():
    snap = fake_status()
    v = snap["workers"][0]
    v.update({"spec_drafts": "12", "spec_draft_tokens": "40", "spec_accepted_tokens": "25",
              "spec_accepted_pos_0": "11", "spec_accepted_pos_1": "8", "spec_accepted_pos_10": "1",
              "spec_accepted_pos_2": "5"})
    fams = exposition(snap)
    assert value(fams, "cosine_spec_decode_num_drafts", worker="verifier-0") == 12  # preferred to draft_jobs
    assert value(fams, "cosine_spec_decode_num_draft_tokens", worker="verifier-0") == 40
    assert value(fams, "cosine_spec_decode_num_accepted_tokens", worker="verifier-0") == 25
    per_pos = fams["cosine_spec_decode_num_accepted_tokens_per_pos"]
    assert per_pos.type == "counter"
    assert [s.labels["position"] for s in per_pos.samples] == ["0", "1", "2", "10"]
    assert sum(s.value for s in per_pos.samples) == 25


def test_counters_are_per_worker_and_empty_families_are_left_out():
    snap = fake_status(control=None, streams=[], dead_letters=0)
    second = {**snap["workers"][0], "id": "verifier-2", "draft_jobs": "3"}
    snap["workers"].append(second)
    fams = {f.name: f for f in families_from_status(snap)}
    drafts = {s.labels["worker"]: s.value for s in fams["cosine_spec_decode_num_drafts"].samples}
    assert drafts == {"verifier-0": 17, "verifier-2": 3}
    assert not any(name.startswith("cosine_control_") for name in fams)
    assert "cosine_stream_depth" not in fams
    assert fams["cosine_dead_letters"].samples[0].value == 0  # always there


def test_a_scrape_without_redis_says_so():
    def down(_settings):
        raise redis.ConnectionError("refused")

    fams = parse(generate_latest(build_registry(RedisSettings(), status=down)))
    assert list(fams) == ["cosine_redis_up"]
    assert value(fams, "cosine_redis_up") == 0


def test_registries_are_fresh_and_each_scrape_reads_once():
    calls = []

    def status(settings):
        calls.append(settings)
        return fake_status()

    a, b = build_registry(RedisSettings(), status=status), build_registry(RedisSettings(), status=status)
    assert calls == []  # registering reads nothing
    generate_latest(a)
    generate_latest(a)
    generate_latest(b)
    assert len(calls) == 3  # each registry scrapes its own collector, once per scrape
    assert b"cosine_" not in generate_latest(REGISTRY)  # the global registry is left alone
    assert isinstance(DeploymentCollector(RedisSettings()).describe(), list)


def test_every_metric_is_documented():
    """Every sample name an exposition can hold (all known heartbeat fields set) appears in docs/metrics.md."""
    snap = fake_status()
    by_role = {"verifier": (WORKER_GAUGES, VERIFIER_GAUGES, VERIFIER_COUNTERS),
               "drafter": (WORKER_GAUGES, DRAFTER_COUNTERS), "controller": (WORKER_GAUGES, CONTROLLER_COUNTERS)}
    for w in snap["workers"][:3]:
        w.update({f.key: "1" for table in by_role[w["role"]] for f in table})
    snap["workers"][0].update({"spec_accepted_tokens": "1", "spec_accepted_pos_0": "1",
                               "latency": LatencyRecorder().wire(),
                               "spec_by": json.dumps({"drafter": {"d": [1, 2, 1]}, "domain": {"code": [1, 2, 1]}})})
    snap["control"].update({f.key: "1" for f in CONTROL_GAUGES})
    snap["streams"][0].update({f.key: 1 for f in (*STREAM_GAUGES, *STREAM_COUNTERS)})
    samples = {f.name if f.type == "histogram" else s.name for f in exposition(snap).values() for s in f.samples}
    assert {"cosine_time_to_first_token_seconds", "cosine_spec_domain_accepted_tokens_total"} <= samples
    documented = set(re.findall(r"`(cosine_[a-z0-9_]+)(?:\{\w+\})?`", DOCS.read_text()))
    assert samples - documented == set()


# -- a live deployment ----------------------------------------------------------------------------------------
# The session's shared deployment: other tests may have used it before, so the counters that must equal what
# this module's requests saw are compared as growth from a reading taken once the deployment is idle.
@pytest.fixture(scope="module")
def cluster(live_cluster):
    return live_cluster


@pytest.fixture(scope="module")
def client(live_client):
    return live_client


def idle_exposition(cluster) -> dict:
    """A scrape once nothing is queued or held and the verifier has published a heartbeat since: its
    counters include every request that ended before, and nothing moves them until the next request."""
    keys = Keys(cluster.prefix)
    r = redis.Redis.from_url(cluster.url)

    def idle():
        groups = [g for g in r.xinfo_groups(keys.requests) if g["name"] == VERIFIERS_GROUP.encode()]
        waiting = [g["lag"] if g["lag"] is not None else r.xlen(keys.requests) for g in groups]
        return all(g["pending"] == 0 for g in groups) and not any(waiting)

    wait_for(idle, 60, what="the shared deployment to finish earlier requests")
    before = heartbeat_until(cluster.url, "verifier", "verifier-0", lambda i: True)
    heartbeat_until(cluster.url, "verifier", "verifier-0",
                    lambda i: float(i["uptime_s"]) > float(before["uptime_s"]) and int(i["active"]) == 0
                    and int(i["waiting"]) == 0)
    return parse(render(cluster.redis_settings()))


@pytest.fixture(scope="module")
def served(cluster, client, zoo_prompts):
    """A few requests run to their end, the workers' heartbeats counting them, and a scrape from before them."""
    base = idle_exposition(cluster)
    done = value(base, "cosine_verifier_completed_requests", worker="verifier-0")
    texts = [zoo_prompts[d][i] for i in range(2) for d in sorted(zoo_prompts)][:4]
    results = [client.result(rid, timeout=300) for rid in [client.submit(t, max_new_tokens=24) for t in texts]]
    assert all(r.finish_reason in ("length", "stop") for r in results)
    heartbeat_until(cluster.url, "verifier", "verifier-0",
                    lambda i: int(i.get("completed", 0)) >= done + len(texts))
    heartbeat_until(cluster.url, "drafter", "drafter-0", lambda i: int(i.get("jobs", 0)) > 0)
    return results, base


def grown(fams: dict, base: dict, name: str, **labels) -> float:
    """How much a counter grew since ``base`` (absent there: since the worker started)."""
    return value(fams, name, **labels) - (value(base, name, **labels) if name in base else 0)


@pytest.mark.slow
def test_live_speculation_counters(cluster, served):
    served, base = served
    fams = parse(render(cluster.redis_settings()))
    assert value(fams, "cosine_redis_up") == 1
    for name in ("cosine_spec_decode_num_drafts", "cosine_spec_decode_num_draft_tokens", "cosine_verifier_rounds",
                 "cosine_verifier_plain_steps", "cosine_verifier_stale_drafts", "cosine_drafter_jobs",
                 "cosine_drafter_lookahead_hits", "cosine_verifier_finished_requests"):
        assert fams[name].type == "counter", name
    drafts = value(fams, "cosine_spec_decode_num_drafts", worker="verifier-0")
    tokens = value(fams, "cosine_spec_decode_num_draft_tokens", worker="verifier-0")
    assert 0 < drafts <= tokens
    # Drafts verified, counted by the verifier as each request's own stats count them.
    assert grown(fams, base, "cosine_spec_decode_num_drafts", worker="verifier-0") == sum(
        r.stats["drafts"] for r in served)
    assert grown(fams, base, "cosine_spec_decode_num_draft_tokens", worker="verifier-0") >= sum(
        r.stats["drafted"] for r in served)
    assert grown(fams, base, "cosine_verifier_completed_requests", worker="verifier-0") >= len(served)
    assert value(fams, "cosine_drafter_jobs", worker="drafter-0") > 0


@pytest.mark.slow
def test_live_accepted_tokens(cluster, served):
    served, base = served
    fams = parse(render(cluster.redis_settings()))
    assert "cosine_spec_decode_num_accepted_tokens" in fams
    accepted = value(fams, "cosine_spec_decode_num_accepted_tokens", worker="verifier-0")
    assert 0 < accepted <= value(fams, "cosine_spec_decode_num_draft_tokens", worker="verifier-0")
    # the heartbeat sums what the requests saw
    assert grown(fams, base, "cosine_spec_decode_num_accepted_tokens", worker="verifier-0") == sum(
        r.stats["accepted"] for r in served)
    per_pos = fams["cosine_spec_decode_num_accepted_tokens_per_pos"].samples
    assert sum(s.value for s in per_pos if s.name.endswith("_total")) == accepted
    by_drafter = fams["cosine_spec_drafter_accepted_tokens"].samples
    assert {s.labels["drafter"] for s in by_drafter} == {"drafter-0"}
    assert sum(s.value for s in by_drafter) == accepted
    assert sum(s.value for s in fams["cosine_spec_domain_accepted_tokens"].samples) == accepted


@pytest.mark.slow
def test_live_latency_histograms(cluster, served):
    """At least one TTFT and one latency observation per request served; latencies past their TTFTs."""
    served, _ = served
    fams = parse(render(cluster.redis_settings()))
    for name in ("cosine_time_to_first_token_seconds", "cosine_e2e_request_latency_seconds",
                 "cosine_time_per_output_token_seconds"):
        assert fams[name].type == "histogram"
        count = value(fams, name, sample=name + "_count", worker="verifier-0")
        assert count >= len(served), name
        buckets = [s for s in fams[name].samples if s.name.endswith("_bucket")]
        assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == count
    ttft = value(fams, "cosine_time_to_first_token_seconds", sample="cosine_time_to_first_token_seconds_sum")
    e2e = value(fams, "cosine_e2e_request_latency_seconds", sample="cosine_e2e_request_latency_seconds_sum")
    assert 0 < ttft < e2e


@pytest.mark.slow
def test_live_worker_gauges(cluster, served):
    fams = parse(render(cluster.redis_settings()))
    up = {(s.labels["role"], s.labels["worker"]): s.value for s in fams["cosine_worker_up"].samples}
    assert up == {("verifier", "verifier-0"): 1, ("drafter", "drafter-0"): 1}
    for name in ("cosine_worker_heartbeat_age_seconds", "cosine_worker_busy_ratio", "cosine_worker_active_requests"):
        assert {s.labels["worker"] for s in fams[name].samples} == {"verifier-0", "drafter-0"}, name
    assert 0 <= value(fams, "cosine_worker_heartbeat_age_seconds", worker="verifier-0") < 3
    assert 0 < value(fams, "cosine_worker_busy_ratio", worker="verifier-0") <= 1
    assert value(fams, "cosine_worker_kv_peak_bytes", role="verifier", worker="verifier-0") > 0
    assert value(fams, "cosine_worker_kv_bytes", role="verifier", worker="verifier-0") >= 0
    assert value(fams, "cosine_verifier_rounds", worker="verifier-0") > 0


@pytest.mark.slow
def test_live_queue_gauges_match_redis(cluster, client, served, zoo_prompts):
    """With the verifier stopped (SIGSTOP) mid-request, the request stream holds still: the gauges of one
    scrape equal XINFO GROUPS and XPENDING read right after it."""
    settings = cluster.redis_settings()
    keys = Keys(settings.prefix)
    r = redis.Redis.from_url(cluster.url)
    texts = [zoo_prompts[d][3] for d in sorted(zoo_prompts)]
    ids = [client.submit(texts[0], max_new_tokens=200)]
    wait_for(lambda: r.xpending(keys.requests, VERIFIERS_GROUP)["pending"] >= 1, what="an admitted request")
    pid = cluster.procs["verifier-0"].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        ids += [client.submit(t, max_new_tokens=8) for t in texts[1:3]]
        fams = parse(render(settings))
        [group] = [g for g in r.xinfo_groups(keys.requests) if g["name"] == VERIFIERS_GROUP.encode()]
        pending = r.xpending(keys.requests, VERIFIERS_GROUP)["pending"]
    finally:
        os.kill(pid, signal.SIGCONT)
    labels = {"stream": keys.requests, "group": VERIFIERS_GROUP, "kind": "requests"}
    assert value(fams, "cosine_stream_waiting", **labels) == group["lag"]
    assert value(fams, "cosine_stream_pending", **labels) == group["pending"] == pending
    assert value(fams, "cosine_stream_depth", **labels) == group["lag"] + pending
    assert value(fams, "cosine_stream_consumers", **labels) == group["consumers"]
    assert group["lag"] + pending >= 2  # the two sent since the stop: nothing acknowledged them
    oldest = int(r.xpending(keys.requests, VERIFIERS_GROUP)["min"].split(b"-")[0])
    age = value(fams, "cosine_stream_oldest_pending_age_seconds", **labels)
    assert 0 < age <= (r.time()[0] * 1000 + r.time()[1] // 1000 - oldest) / 1000
    assert value(fams, "cosine_dead_letters") == r.xlen(keys.dlq)
    depths = {s.labels["kind"] for s in fams["cosine_stream_depth"].samples}
    assert depths == {"requests", "draft", "verify"}
    for rid in ids:
        assert client.result(rid, timeout=300).finish_reason in ("length", "stop")


def test_the_grafana_dashboard_queries_only_documented_metrics():
    """deploy/grafana-cosine.json, as shipped: valid JSON, and every metric its queries name is one we export."""
    board = json.loads((DOCS.parent.parent / "deploy" / "grafana-cosine.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    named = {re.sub(r"_bucket$", "", m) for e in exprs for m in re.findall(r"\b(cosine_[a-z0-9_]+)", e)}
    documented = set(re.findall(r"`(cosine_[a-z0-9_]+)(?:\{\w+\})?`", DOCS.read_text()))
    assert named and named - documented == set()
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
