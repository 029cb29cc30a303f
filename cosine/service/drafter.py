"""The drafter service: consume this worker's draft-job stream in batches, draft, reply to verifiers.

One worker hosts one or more drafter models (experts). Per request it keeps the committed tokens it was
told (jobs carry only the tokens after ``base``) and which expert drafts for it; the engine's drafters
keep the KV rows. A job whose ``base`` the worker cannot honour (it restarted, or evicted the request) is
answered with ``resync`` and the verifier resends the whole sequence. Replies and the acknowledgement of
the jobs they answer go out in one MULTI; malformed jobs go to the dead-letter stream; a failure while
drafting answers the batch with empty drafts (the verifier then decodes alone) and never kills the worker.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import redis
import torch

from cosine import defaults
from cosine.broker import RedisSettings, Streams, connect, is_nogroup
from cosine.engine.drafter import Drafter, DraftRequest
from cosine.engine.prompt_scoring import best_by_prompt_loss
from cosine.keys import DRAFTERS_GROUP, Keys
from cosine.protocol import Draft, DraftClose, DraftJob, ProtocolError, decode_entry, entry
from cosine.sampling_params import SamplingParams
from cosine.service.heartbeat import Heartbeat
from cosine.service.loop import Backoff

log = logging.getLogger(__name__)


@dataclass
class DrafterSettings:
    worker_id: str
    batch_max: int = defaults.DRAFTER_BATCH_MAX
    window_ms: float = defaults.DRAFTER_WINDOW_MS
    block_ms: int = defaults.DRAFTER_BLOCK_MS
    idle_evict_s: float = defaults.DRAFTER_IDLE_EVICT_S


@dataclass
class _Known:
    tokens: list[int]
    expert: str
    seen: float


def _draft_request(job: DraftJob, tokens: list[int]) -> DraftRequest:
    if job.proposal == "sampled":
        params = SamplingParams(temperature=job.temperature, top_p=job.top_p, top_k=job.top_k)
        return DraftRequest(job.request_id, tokens, job.k, 1, params, job.seed, job.position, "sampled", job.q_top)
    return DraftRequest(job.request_id, tokens, job.k, job.width)


class DrafterService:
    def __init__(self, redis_settings: RedisSettings, settings: DrafterSettings, drafters: dict[str, Drafter],
                 vocab_size: int) -> None:
        self.settings = settings
        self.keys = Keys(redis_settings.prefix)
        self.streams = Streams(connect(redis_settings), self.keys)
        self.drafters = drafters
        self.vocab = vocab_size
        self.stream = self.keys.draft(settings.worker_id)
        self.requests: dict[str, _Known] = {}
        self.started = time.monotonic()
        self.busy_s = 0.0
        self.jobs = 0
        self.batches = 0
        self.resyncs = 0
        self.heartbeat = Heartbeat(Streams(connect(redis_settings), self.keys), settings.worker_id, self.info)

    def info(self) -> dict:
        up = max(time.monotonic() - self.started, 1e-9)
        return {
            "role": "drafter",
            "experts": ",".join(sorted(self.drafters)),
            "active": len(self.requests),
            "jobs": self.jobs,
            "batches": self.batches,
            "resyncs": self.resyncs,
            "busy": round(self.busy_s / up, 4),
            "busy_s": round(self.busy_s, 4),
            "pid": os.getpid(),
        }

    # -- loop -----------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        self.heartbeat.beat()
        self.heartbeat.start()
        backoff = Backoff()
        log.info("drafter %s serving experts %s on %s", self.settings.worker_id, sorted(self.drafters), self.stream)
        try:
            first = True
            while not stop.is_set():
                try:
                    if first:
                        self.streams.ensure_group(self.stream, DRAFTERS_GROUP)
                        self.handle(self.streams.own_pending(self.stream, DRAFTERS_GROUP, self.settings.worker_id))
                        first = False
                    batch = self.streams.read_batch(
                        self.stream, DRAFTERS_GROUP, self.settings.worker_id, self.settings.batch_max,
                        self.settings.window_ms, self.settings.block_ms,
                    )
                    if batch:
                        self.handle(batch)
                    self.evict_idle()
                    backoff.reset()
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    backoff.wait(stop, f"drafter {self.settings.worker_id}: Redis unavailable ({exc})")
                except redis.ResponseError as exc:
                    if is_nogroup(exc):
                        self.streams.forget_groups()
                        first = True
                    else:
                        log.exception("Redis refused a command")
                    backoff.wait(stop, f"drafter {self.settings.worker_id}: {exc}")
                except Exception:  # never die of one bad batch: log, back off, go on
                    log.exception("drafter %s: unexpected error in the loop", self.settings.worker_id)
                    backoff.wait(stop, f"drafter {self.settings.worker_id}: recovering from an unexpected error")
        finally:
            self.heartbeat.stop()
            log.info("drafter %s stopped", self.settings.worker_id)

    def handle(self, entries: list) -> None:
        """Draft for a batch of stream entries and reply, acknowledging them with the replies."""
        if not entries:
            return
        t0 = time.perf_counter()
        latest: dict[str, DraftJob] = {}
        done_ids = []
        for eid, fields in entries:
            try:
                msg = decode_entry(fields, (DraftJob, DraftClose), self.vocab)
            except ProtocolError as exc:
                self.streams.dead_letter(self.stream, DRAFTERS_GROUP, eid, fields, exc.reason,
                                         self.settings.worker_id)
                continue
            done_ids.append(eid)
            if isinstance(msg, DraftClose):
                self.release(msg.request_id)
                latest.pop(msg.request_id, None)
            elif msg.request_id not in latest or msg.epoch >= latest[msg.request_id].epoch:
                latest[msg.request_id] = msg  # an older job for the same request is stale
        replies = self.draft_all(list(latest.values()))
        elapsed_ms = (time.perf_counter() - t0) * 1000
        pipe = self.streams.r.pipeline(transaction=True)
        for job, reply in replies:
            reply.draft_ms = round(elapsed_ms, 3)
            pipe.xadd(self.keys.verify(job.verifier), entry(reply), maxlen=defaults.STREAM_MAXLEN, approximate=True)
        Streams.ack_delete(pipe, self.stream, DRAFTERS_GROUP, done_ids)
        pipe.execute()
        self.busy_s += time.perf_counter() - t0
        self.jobs += len(latest)
        self.batches += 1

    def draft_all(self, jobs: list[DraftJob]) -> list[tuple[DraftJob, Draft]]:
        replies: list[tuple[DraftJob, Draft]] = []
        runnable: list[tuple[DraftJob, list[int]]] = []
        for job in jobs:
            tokens = self._sequence(job)
            if tokens is None:
                self.resyncs += 1
                replies.append((job, self._reply(job, resync=True)))
            else:
                runnable.append((job, tokens))
        new = [(job, toks) for job, toks in runnable if self.requests[job.request_id].expert == ""]
        if new:
            chosen = best_by_prompt_loss({n: d.runner.model for n, d in self.drafters.items()}, [t for _, t in new])
            for (job, _), name in zip(new, chosen):
                self.requests[job.request_id].expert = name
        by_expert: dict[str, list[tuple[DraftJob, list[int]]]] = {}
        for job, toks in runnable:
            by_expert.setdefault(self.requests[job.request_id].expert, []).append((job, toks))
        for name, group in by_expert.items():
            drafter = self.drafters[name]
            try:
                trees = drafter.draft([_draft_request(job, toks) for job, toks in group])
            except Exception:  # a drafting failure must cost speed, never the worker
                log.exception("drafting failed for %d requests on %s; replying with empty drafts", len(group), name)
                drafter.release([job.request_id for job, _ in group])
                trees = {}
            for job, _ in group:
                tree = trees.get(job.request_id)
                reply = self._reply(job)
                if tree is not None:
                    reply.tokens, reply.parents = tree.tokens, tree.parents
                    reply.confidences = [min(1.0, max(0.0, c)) for c in tree.confidences]
                    reply.sources = list(tree.sources)
                    if tree.q is not None:  # sampled drafts: send the (truncated) proposal distributions
                        for q in tree.q:
                            nz = torch.nonzero(q, as_tuple=False).flatten()
                            reply.q_ids.append(nz.tolist())
                            reply.q_probs.append([min(1.0, float(v)) for v in q[nz]])
                replies.append((job, reply))
        return replies

    def _reply(self, job: DraftJob, resync: bool = False) -> Draft:
        return Draft(job.request_id, self.settings.worker_id, job.epoch, resync=resync, job_sent_ms=job.sent_ms)

    def _sequence(self, job: DraftJob) -> list[int] | None:
        """The request's committed tokens, rebuilt from what this worker knows plus the job's tokens."""
        known = self.requests.get(job.request_id)
        if job.base == 0:
            tokens = list(job.tokens)
        elif known is not None and len(known.tokens) >= job.base:
            tokens = known.tokens[: job.base] + list(job.tokens)
        else:
            return None
        expert = job.expert if job.expert in self.drafters else (known.expert if known else "")
        if known is not None and expert != known.expert and known.expert:
            self.drafters[known.expert].release([job.request_id])
        self.requests[job.request_id] = _Known(tokens, expert, time.monotonic())
        return tokens

    def release(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
        for d in self.drafters.values():
            d.release([request_id])

    def evict_idle(self) -> None:
        cutoff = time.monotonic() - self.settings.idle_evict_s
        for rid in [r for r, k in self.requests.items() if k.seen < cutoff]:
            log.info("evicting idle request %s", rid)
            self.release(rid)
