"""Prometheus metrics for a deployment, read from Redis at each scrape.

Nothing is counted in this process: :class:`DeploymentCollector` takes :func:`cosine.status.collect_status`'s
snapshot (what ``cosine status`` shows: the workers' heartbeats, the streams' groups, dead letters, the
controller's decision) and :func:`families_from_status` turns it into metric families, a pure function of the
snapshot. Counters are the workers' own cumulative counters, labelled by worker (a worker restarted under the
same id starts again from 0, which ``rate()`` reads as a reset); gauges are what the snapshot says now.

The speculation counters carry vLLM's names (``cosine_spec_decode_*``), from the verifiers' ``spec_drafts``,
``spec_draft_tokens``, ``spec_accepted_tokens`` and ``spec_accepted_pos_{i}`` (counted per verified draft);
verifiers of earlier versions published only ``draft_jobs``/``draft_positions`` (jobs sent), used in their
place. Every metric is listed in docs/metrics.md.

Use::

    registry = build_registry(settings)        # a fresh CollectorRegistry holding one DeploymentCollector
    body = generate_latest(registry)           # or render(settings), served as CONTENT_TYPE_LATEST
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import redis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from cosine import histogram
from cosine.broker import RedisSettings
from cosine.histogram import merged
from cosine.keys import Keys
from cosine.status import collect_status

__all__ = ["CONTENT_TYPE_LATEST", "DeploymentCollector", "build_registry", "families_from_status", "render"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Field:
    """One heartbeat field exposed as one metric family (the value divided by ``per``: 1000 for ms)."""

    key: str
    name: str  # the family's name; counters get ``_total`` in the exposition
    help: str
    per: float = 1.0


# Gauges every role may publish, labelled by role and worker.
WORKER_GAUGES = (
    Field("heartbeat_age_s", "cosine_worker_heartbeat_age_seconds",
          "Seconds since the worker's last heartbeat, by the broker's clock."),
    Field("busy", "cosine_worker_busy_ratio",
          "Share of the worker's uptime spent on model work (verifier: target forwards; drafter: draft jobs)."),
    Field("active", "cosine_worker_active_requests",
          "Requests the worker holds now (verifier: admitted; drafter: requests it keeps draft state for)."),
    Field("uptime_s", "cosine_worker_uptime_seconds", "Seconds since the worker's service started."),
    Field("kv_bytes", "cosine_worker_kv_bytes", "Bytes the worker's target KV cache holds now."),
    Field("kv_peak_bytes", "cosine_worker_kv_peak_bytes", "Most bytes the worker's target KV cache has held."),
    Field("kv_capacity_tokens", "cosine_worker_kv_capacity_tokens",
          "The KV budget in token slots (absent when the worker has no budget)."),
    Field("rss_peak_bytes", "cosine_worker_rss_peak_bytes", "The worker process's peak resident memory in bytes."),
    Field("cuda_peak_bytes", "cosine_worker_cuda_peak_bytes", "Torch's peak CUDA memory allocated, in bytes."),
)

VERIFIER_GAUGES = (
    Field("capacity", "cosine_verifier_capacity_requests", "Requests the verifier may hold at once (max_active)."),
    Field("waiting", "cosine_verifier_waiting_requests",
          "Requests the verifier has read but not admitted: their KV reservation does not fit yet."),
    Field("draft_budget_ms", "cosine_verifier_draft_budget_seconds",
          "How long a draft may take before its request is verified without it (a plain step).", 1000.0),
    Field("draft_rtt_p50_ms", "cosine_verifier_draft_rtt_p50_seconds",
          "Median round trip of recent draft jobs, from sending the job to reading the draft.", 1000.0),
)

VERIFIER_COUNTERS = (
    Field("rounds", "cosine_verifier_rounds", "Verification passes whose target forward completed."),
    Field("passes", "cosine_verifier_passes", "Verification passes started (a pass is one batched forward)."),
    Field("pass_tokens", "cosine_verifier_pass_tokens",
          "Tokens fed to verification passes: per request and pass, its last token and its draft's nodes."),
    Field("slots_run", "cosine_verifier_slots_run", "Token slots the target's forwards computed, padding included."),
    Field("slots_fed", "cosine_verifier_slots_fed", "Token slots of the target's forwards that held a fed token."),
    Field("output_tokens", "cosine_verifier_output_tokens", "Output tokens the verifier wrote to output streams."),
    Field("admitted", "cosine_verifier_admitted_requests", "Requests admitted (prefilled) by the verifier."),
    Field("completed", "cosine_verifier_completed_requests", "Requests the verifier ended, for any reason."),
    Field("rejected", "cosine_verifier_rejected_requests",
          "Requests refused with an error (invalid parameters, beyond the KV budget, delivered too often)."),
    Field("duplicate_requests", "cosine_verifier_duplicate_requests",
          "Admission entries for a request already held or already ended (not run twice)."),
    Field("resumed", "cosine_verifier_resumed_requests",
          "Requests taken over from another verifier, resumed from their output stream."),
    Field("output_resyncs", "cosine_verifier_output_resyncs",
          "Output chunks written again after the broker came back without them (a failover, a failed write)."),
    Field("prefill_failed", "cosine_verifier_prefill_failed_requests", "Requests whose prefill raised."),
    Field("kv_waits", "cosine_verifier_kv_waits", "Times a request read was left waiting for KV room."),
    Field("reclaimed", "cosine_verifier_reclaimed_requests",
          "Requests claimed from a dead verifier's pending entries."),
    Field("lost_ownership", "cosine_verifier_lost_ownership_requests",
          "Requests let go because another verifier had taken them over."),
    Field("strays", "cosine_verifier_stray_requests",
          "Admission entries delivered to the verifier but never seen (a lost reply), read again."),
    Field("dead_lettered", "cosine_verifier_dead_lettered", "Messages the verifier moved to the dead-letter stream."),
    Field("plain_steps", "cosine_verifier_plain_steps",
          "Request rounds verified without a draft (no drafter or a draft length of 0): a target-only step."),
    Field("stale_drafts", "cosine_verifier_stale_drafts",
          "Drafts that arrived for a round already past (or from a drafter no longer assigned) and were dropped."),
    Field("late_drafts", "cosine_verifier_late_drafts",
          "Request rounds verified without their draft because it exceeded the draft budget."),
    Field("resyncs", "cosine_verifier_resyncs",
          "Drafts that asked for a resync (the drafter had lost the request's tokens)."),
    Field("lookahead_hits", "cosine_verifier_lookahead_hits",
          "Drafts verified that a drafter built ahead of time, on the outcome of the previous pass."),
    Field("bets_taken", "cosine_verifier_bets_taken",
          "Lookahead drafts (bets) taken because they assumed the tokens that were committed."),
    Field("held_passes", "cosine_verifier_held_passes", "Passes held back to wait for drafts on their way."),
    Field("drafter_moves", "cosine_verifier_drafter_moves",
          "Requests moved to another drafter worker (or another lead drafter)."),
    Field("drafters_refused", "cosine_verifier_drafters_refused",
          "Drafter workers refused for a request (incompatible tokenizer or vocabulary)."),
    Field("busy_s", "cosine_verifier_forward_seconds", "Seconds in target forwards, prefills included."),
    Field("admit_s", "cosine_verifier_prefill_seconds", "Seconds prefilling admitted requests (part of forwards)."),
    Field("messaging_s", "cosine_verifier_messaging_seconds",
          "Seconds in Redis calls and (de)serialisation on the round path."),
    Field("blocked_s", "cosine_verifier_blocked_seconds", "Seconds in blocking reads (idle or waiting for drafts)."),
    Field("draft_wait_s", "cosine_verifier_draft_wait_seconds",
          "Seconds blocked while holding requests: waiting for drafts (part of blocked)."),
    Field("scheduling_s", "cosine_verifier_scheduling_seconds", "Seconds choosing what to verify."),
)

DRAFTER_COUNTERS = (
    Field("jobs", "cosine_drafter_jobs", "Draft jobs the drafter handled (the latest per request of each read)."),
    Field("batches", "cosine_drafter_batches", "Batched drafting forwards over its jobs."),
    Field("resyncs", "cosine_drafter_resyncs", "Jobs answered with a resync (the request's tokens were lost)."),
    Field("bets_sent", "cosine_drafter_bets_sent", "Lookahead drafts (bets on the next pass's outcome) sent."),
    Field("lookahead_hits", "cosine_drafter_lookahead_hits",
          "Jobs a bet sent ahead of time had answered already (nothing drafted)."),
    Field("lookahead_misses", "cosine_drafter_lookahead_misses", "Jobs for which bets had been sent but none matched."),
    Field("busy_s", "cosine_drafter_busy_seconds", "Seconds handling draft jobs (lookahead not included)."),
    Field("lookahead_s", "cosine_drafter_lookahead_seconds", "Seconds drafting bets ahead of time."),
    Field("votes_served", "cosine_drafter_votes_served",
          "Votes this drafter sent in answer to other drafters' fusion asks."),
    Field("vote_rounds", "cosine_drafter_vote_rounds", "Fusion rounds that asked other drafter workers."),
    Field("vote_asks", "cosine_drafter_vote_asks", "Asks sent to other drafter workers."),
    Field("vote_timeouts", "cosine_drafter_vote_timeouts", "Asks that other drafter workers did not answer in time."),
    Field("vote_resyncs", "cosine_drafter_vote_resyncs",
          "Votes that came back as resyncs (the peer had lost the request's tokens)."),
    Field("vote_wait_s", "cosine_drafter_vote_wait_seconds", "Seconds waiting for other drafter workers' votes."),
)

CONTROLLER_COUNTERS = (
    Field("decisions", "cosine_controller_decisions", "Control decisions this controller process published."),
)

# The controller's published decision (the {p}:control hash), unlabelled gauges.
CONTROL_GAUGES = (
    Field("version", "cosine_control_version", "Version of the controller's current decision (workers apply it)."),
    Field("age_s", "cosine_control_age_seconds", "Seconds since the current decision was made."),
    Field("k_min", "cosine_control_k_min", "The decision's smallest draft length."),
    Field("k_max", "cosine_control_k_max", "The decision's largest draft length."),
    Field("max_cooperating", "cosine_control_max_cooperating", "Drafter workers that may cooperate on a request."),
    Field("verifier_max_batch", "cosine_control_verifier_max_batch", "Requests a verifier may verify per pass."),
    Field("verifier_token_cap", "cosine_control_verifier_token_cap", "Tokens a verifier may feed per pass."),
    Field("pressure", "cosine_control_pressure", "Advisory load pressure of the decision, -1 .. 1."),
)

STREAM_GAUGES = (
    Field("lag", "cosine_stream_waiting",
          "Entries not yet delivered to the group (XINFO GROUPS lag; absent where Redis cannot tell)."),
    Field("pending", "cosine_stream_pending", "Entries delivered and not yet acknowledged (XPENDING count)."),
    Field("depth", "cosine_stream_depth", "Waiting plus pending entries (the stream's length where lag is unknown)."),
    Field("consumers", "cosine_stream_consumers", "Consumers the group has."),
    Field("oldest_waiting_age_s", "cosine_stream_oldest_waiting_age_seconds",
          "Age of the oldest entry not yet delivered to the group (absent when none waits)."),
    Field("oldest_pending_age_s", "cosine_stream_oldest_pending_age_seconds",
          "Age of the oldest entry delivered and not acknowledged (absent when none is pending)."),
)

STREAM_COUNTERS = (
    Field("acked", "cosine_stream_acked",
          "Entries the group read and acknowledged (XINFO GROUPS entries-read minus pending)."),
    Field("entries_added", "cosine_stream_entries_added",
          "Entries ever added to the stream (XINFO STREAM entries-added), per group for rate() beside acked."),
)

LATENCY = {"ttft": "cosine_time_to_first_token_seconds", "tpot": "cosine_time_per_output_token_seconds",
           "e2e": "cosine_e2e_request_latency_seconds"}

SPEC_BY = {"drafts": "Drafts verified", "draft_tokens": "Draft tokens verified",
           "accepted_tokens": "Draft tokens accepted"}

SPEC_DRAFTS = ("cosine_spec_decode_num_drafts",
               "Speculative drafts: rounds of a request that had a draft (vLLM's num_drafts). From spec_drafts, "
               "or draft_jobs (jobs sent, stale and late drafts included) where a verifier does not publish it.")
SPEC_DRAFT_TOKENS = ("cosine_spec_decode_num_draft_tokens",
                     "Draft tokens proposed, by draft depth (vLLM's num_draft_tokens). From spec_draft_tokens, or "
                     "draft_positions (positions asked of draft jobs) where a verifier does not publish it.")
SPEC_ACCEPTED = ("cosine_spec_decode_num_accepted_tokens",
                 "Draft tokens accepted by verification (vLLM's num_accepted_tokens; heartbeat spec_accepted_tokens).")
SPEC_ACCEPTED_POS = ("cosine_spec_decode_num_accepted_tokens_per_pos",
                     "Draft tokens accepted at each draft position from 0 (vLLM's num_accepted_tokens_per_pos; "
                     "heartbeat spec_accepted_pos_{i}).")

_ACCEPTED_POS = re.compile(r"^spec_accepted_pos_(\d+)$")
_FINISH = re.compile(r"^finish_(\w+)$")
_MISSED = re.compile(r"^lookahead_missed_(\w+)$")


def _number(value) -> float | None:
    """A heartbeat value as a number (they are stored as strings); None for '' or anything not numeric."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return None if math.isnan(value) else float(value)
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


class _Families:
    """Families by name, created on first use, yielded in that order and only when they hold samples."""

    def __init__(self) -> None:
        self._by_name: dict[str, Metric] = {}

    def get(self, kind: str, name: str, help_text: str, labels: list[str]) -> Metric:
        fam = self._by_name.get(name)
        if fam is None:
            cls = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}
            fam = self._by_name[name] = cls[kind](name, help_text, labels=labels)
        return fam

    def add(self, kind: str, name: str, help_text: str, labels: dict[str, str], value: float | None) -> None:
        if value is None:
            return
        self.get(kind, name, help_text, list(labels)).add_metric(list(labels.values()), value)

    def add_fields(self, kind: str, fields: Iterable[Field], source: dict, labels: dict[str, str]) -> None:
        for f in fields:
            if f.key in source:
                value = _number(source[f.key])
                self.add(kind, f.name, f.help, labels, None if value is None else value / f.per)

    def __iter__(self) -> Iterator[Metric]:
        return (fam for fam in self._by_name.values() if fam.samples)


def _speculation(fams: _Families, info: dict, labels: dict[str, str]) -> None:
    drafts = info.get("spec_drafts", info.get("draft_jobs"))
    tokens = info.get("spec_draft_tokens", info.get("draft_positions"))
    fams.add("counter", *SPEC_DRAFTS, labels, _number(drafts))
    fams.add("counter", *SPEC_DRAFT_TOKENS, labels, _number(tokens))
    fams.add("counter", *SPEC_ACCEPTED, labels, _number(info.get("spec_accepted_tokens")))
    by_pos = sorted((int(m.group(1)), key) for key in info if (m := _ACCEPTED_POS.match(key)))
    for pos, key in by_pos:
        fams.add("counter", *SPEC_ACCEPTED_POS, {**labels, "position": str(pos)}, _number(info[key]))


def _latency(fams: _Families, info: dict, labels: dict[str, str]) -> None:
    """The verifier's latency histograms (heartbeat ``latency``), one series per worker."""
    if "latency" not in info:
        return
    for key, hist in merged([info["latency"]]).items():
        fams.get("histogram", LATENCY[key], histogram.HELP[key], list(labels)).add_metric(
            list(labels.values()), hist.cumulative(), hist.total)


def _spec_by(fams: _Families, info: dict, labels: dict[str, str]) -> None:
    """Speculation counters by drafter worker and by domain (heartbeat ``spec_by``)."""
    try:
        spec_by = json.loads(info.get("spec_by") or "{}")
    except ValueError:
        return
    for kind in ("drafter", "domain"):
        for name, tally in sorted((spec_by.get(kind) or {}).items()):
            for (what, help_text), value in zip(SPEC_BY.items(), tally):
                fams.add("counter", f"cosine_spec_{kind}_{what}", f"{help_text}, by {kind}.",
                         {**labels, kind: str(name)}, _number(value))


def _labelled(fams: _Families, info: dict, pattern: re.Pattern, name: str, help_text: str, label: str,
              labels: dict[str, str]) -> None:
    for key in sorted(info):
        m = pattern.match(key)
        if m:
            fams.add("counter", name, help_text, {**labels, label: m.group(1)}, _number(info[key]))


def _worker(fams: _Families, w: dict) -> None:
    role = str(w.get("role", "unknown"))
    who = {"role": role, "worker": str(w["id"])}
    fams.add("gauge", "cosine_worker_up", "1 while the worker's heartbeat is recent, 0 once it is late (dead).",
             who, 1.0 if w.get("alive") else 0.0)
    fams.add_fields("gauge", WORKER_GAUGES, w, who)
    version = w.get("control_version", w.get("version") if role == "controller" else None)
    fams.add("gauge", "cosine_worker_control_version",
             "Control decision version the worker applies (controller: the version it holds).", who, _number(version))
    mine = {"worker": who["worker"]}
    if role == "verifier":
        fams.add_fields("gauge", VERIFIER_GAUGES, w, mine)
        _speculation(fams, w, mine)
        _spec_by(fams, w, mine)
        _latency(fams, w, mine)
        fams.add_fields("counter", VERIFIER_COUNTERS, w, mine)
        _labelled(fams, w, _FINISH, "cosine_verifier_finished_requests",
                  "Requests ended, by finish reason (stop, length, timeout, cancelled, error, ...).", "reason", mine)
    elif role == "drafter":
        fams.add_fields("counter", DRAFTER_COUNTERS, w, mine)
        _labelled(fams, w, _MISSED, "cosine_drafter_lookahead_missed",
                  "Lookahead misses by why no bet matched (bonus: the whole draft was accepted, ...).", "kind", mine)
    elif role == "controller":
        fams.add("gauge", "cosine_controller_leader", "1 for the controller that decides, 0 for a standby.", mine,
                 1.0 if w.get("state") == "active" else 0.0 if "state" in w else None)
        fams.add_fields("counter", CONTROLLER_COUNTERS, w, mine)


def families_from_status(snapshot: dict) -> list[Metric]:
    """The metric families of a :func:`cosine.status.collect_status` snapshot (no I/O). Families without
    samples are left out: a metric no worker publishes is absent, not 0."""
    fams = _Families()
    keys = Keys(snapshot.get("prefix") or "cosine")
    for s in snapshot.get("streams", []):
        stream = str(s["stream"])
        labels = {"stream": stream, "kind": keys.kind(stream), "group": str(s["group"])}
        fams.add_fields("gauge", STREAM_GAUGES, s, labels)
        fams.add_fields("counter", STREAM_COUNTERS, s, labels)
    fams.add("gauge", "cosine_dead_letters", "Entries in the dead-letter stream (malformed or poison messages).", {},
             _number(snapshot.get("dead_letters", 0)))
    for w in sorted(snapshot.get("workers", []), key=lambda w: (str(w.get("role", "")), str(w["id"]))):
        _worker(fams, w)
    if snapshot.get("control"):
        fams.add_fields("gauge", CONTROL_GAUGES, snapshot["control"], {})
    return list(fams)


class DeploymentCollector(Collector):
    """Reads the deployment under ``settings`` at each scrape (``status`` is :func:`collect_status`, replaceable
    in tests). If Redis cannot be read, the scrape holds ``cosine_redis_up 0`` and nothing else."""

    def __init__(self, settings: RedisSettings, status: Callable[[RedisSettings], dict] = collect_status) -> None:
        self.settings = settings
        self.status = status

    def describe(self) -> list[Metric]:
        return []  # registering must not read Redis; the names vary with the workers anyway

    def collect(self) -> Iterator[Metric]:
        t0 = time.perf_counter()
        up = GaugeMetricFamily("cosine_redis_up", "1 if this scrape read the deployment from Redis, else 0.")
        try:
            snapshot = self.status(self.settings)
        except redis.RedisError as exc:
            log.warning("metrics scrape could not read Redis: %s", exc)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from families_from_status(snapshot)
        took = GaugeMetricFamily("cosine_scrape_duration_seconds", "Seconds this scrape took to read Redis.")
        took.add_metric([], time.perf_counter() - t0)
        yield took


def build_registry(settings: RedisSettings, status: Callable[[RedisSettings], dict] = collect_status
                   ) -> CollectorRegistry:
    """A fresh registry holding only a :class:`DeploymentCollector` (no process or platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DeploymentCollector(settings, status))
    return registry


def render(settings: RedisSettings) -> bytes:
    """The deployment's metrics in Prometheus's text format (serve with ``Content-Type: CONTENT_TYPE_LATEST``)."""
    return generate_latest(build_registry(settings))
