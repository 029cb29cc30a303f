"""A whole simulated cluster in one process: the real services over a real Redis, simulated forward passes.

:class:`SimCluster` runs the real verifier, drafter and controller services
(:mod:`cosine.service.verifier_service`, :mod:`~cosine.service.drafter_service`,
:mod:`~cosine.service.controller_service`) as threads, each with its own Redis connections, so 16+ drafter
workers fit on one machine; only the forwards are replaced (:mod:`cosine.sim.engines`, timed by
:mod:`cosine.sim.costs`). :func:`run_workload` drives requests through the real :class:`cosine.client.Client`
(closed loop or Poisson arrivals), measures like ``cosine bench`` and checks every output against the
target-only continuation. Workers share this process's cores and GIL, so timings mean something at
``time_scale`` 1 only; requests decode greedily. More: ``docs/simulation.md``.
"""

from __future__ import annotations

import itertools
import logging
import pathlib
import statistics
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from collections.abc import Sequence as Seq

from cosine.bench.timing import RequestTiming, percentile, poisson_arrivals
from cosine.broker import RedisSettings, Streams, connect
from cosine.engine.sequence import SpecStats
from cosine.keys import Keys
from cosine.policy.steering import Switches
from cosine.service.drafter_service import DrafterService, DrafterSettings
from cosine.service.verifier_service import VerifierService, VerifierSettings
from cosine.sim.costs import (
    A100X4_70B,
    DOMAINS,
    RTX3090_68M,
    AcceptanceModel,
    DrafterCost,
    TargetCost,
    sim_cost_model,
)
from cosine.sim.engines import VOCAB_SIZE, SimFusedDrafter, SimModel, SimTarget, SimTokenizer, SimWorkload

log = logging.getLogger(__name__)

try:  # the controller is optional: the cluster runs without it (workers then use their own settings)
    from cosine.service.controller_service import ControllerService, ControllerSettings
except Exception as _exc:  # noqa: BLE001 - any import failure just disables it
    ControllerService = ControllerSettings = None  # type: ignore[assignment,misc]
    _CONTROLLER_ERROR: str | None = f"{type(_exc).__name__}: {_exc}"
else:
    _CONTROLLER_ERROR = None


class SimCluster:
    """``with SimCluster(url, verifiers=2, drafters=16) as cluster: run_workload(cluster, 64, concurrency=16)``.

    ``experts_per_drafter``: the experts every drafter worker hosts (a tuple of names), or one tuple per
    worker (a list of tuples, cycled). ``verifier_settings`` / ``drafter_settings`` /
    ``controller_settings``: overrides of the services' settings fields. ``time_scale`` scales every
    simulated forward (0 = no sleeping at all). ``cost_profile``: give the verifiers' scheduler a cost model
    fitted to the simulated hardware (:func:`cosine.sim.costs.sim_cost_model`, what ``cosine profile`` would
    measure there) instead of the built-in CPU-zoo numbers.
    """

    def __init__(self, redis_url: str, verifiers: int = 2, drafters: int = 16,
                 experts_per_drafter: Seq[str] | Seq[Seq[str]] = DOMAINS,
                 target_cost: TargetCost = A100X4_70B, drafter_cost: DrafterCost = RTX3090_68M,
                 verifier_switches: Switches | None = None, controller: bool = True, time_scale: float = 1.0,
                 acceptance: AcceptanceModel | None = None, prefix: str | None = None,
                 vocab_size: int = VOCAB_SIZE, max_positions: int = 4096, seed: int = 0,
                 verifier_settings: dict | None = None, drafter_settings: dict | None = None,
                 controller_settings: dict | None = None, cost_profile: bool = True) -> None:
        if verifiers < 1:
            raise ValueError("a cluster needs at least one verifier")
        self.url = redis_url
        self.prefix = prefix or f"cosine-sim-{uuid.uuid4().hex[:8]}"
        self.redis = RedisSettings(url=redis_url, prefix=self.prefix)
        self.n_verifiers = verifiers
        self.n_drafters = drafters
        if experts_per_drafter and all(isinstance(e, str) for e in experts_per_drafter):
            self.expert_sets = [tuple(experts_per_drafter)]  # type: ignore[arg-type]
        else:
            self.expert_sets = [tuple(s) for s in experts_per_drafter]  # type: ignore[union-attr]
        if not self.expert_sets or not all(self.expert_sets):
            raise ValueError("every drafter worker needs at least one expert")
        self.target_cost = target_cost
        self.drafter_cost = drafter_cost
        self.switches = verifier_switches or Switches()
        self.want_controller = controller
        self.time_scale = time_scale
        self.acceptance = acceptance or AcceptanceModel()
        self.model = SimModel(vocab_size, seed)
        self.tokenizer = SimTokenizer(vocab_size)
        self.max_positions = max_positions
        self.verifier_overrides = dict(verifier_settings or {})
        self.drafter_overrides = dict(drafter_settings or {})
        self.controller_overrides = dict(controller_settings or {})
        self.cost_profile = cost_profile
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.stop_event = threading.Event()
        self.verifiers: list[VerifierService] = []
        self.drafters: list[DrafterService] = []
        self.controller: ControllerService | None = None  # type: ignore[valid-type]
        self.controller_error: str | None = None
        self.threads: list[threading.Thread] = []

    # -- lifecycle ------------------------------------------------------------------------------------
    def _build(self) -> None:
        profile = None
        if self.cost_profile and "cost_model" not in self.verifier_overrides:
            self._tmp = tempfile.TemporaryDirectory(prefix="cosine-sim-")
            profile = str(pathlib.Path(self._tmp.name) / "cost_model.json")
            sim_cost_model(self.target_cost, self.drafter_cost).save(profile)
        for i in range(self.n_verifiers):
            settings = VerifierSettings(worker_id=f"verifier-{i}", switches=self.switches, cost_model=profile)
            for k, v in self.verifier_overrides.items():
                setattr(settings, k, v)
            engine = SimTarget(self.model, self.target_cost, self.time_scale, self.max_positions)
            self.verifiers.append(VerifierService(self.redis, settings, engine, self.tokenizer))
        for i in range(self.n_drafters):
            experts = self.expert_sets[i % len(self.expert_sets)]
            settings = DrafterSettings(worker_id=f"drafter-{i}")
            for k, v in self.drafter_overrides.items():
                setattr(settings, k, v)
            fused = SimFusedDrafter(experts, self.acceptance, self.drafter_cost, model=self.model,
                                    time_scale=self.time_scale, seed=1000 + i)
            self.drafters.append(DrafterService(self.redis, settings, {}, self.model.vocab_size, fused=fused,
                                                features=fused.features))
        if self.want_controller:
            if ControllerService is None:
                self.controller_error = f"cosine.service.controller_service is not importable ({_CONTROLLER_ERROR})"
                log.warning("running without a controller: %s", self.controller_error)
            else:
                settings = ControllerSettings(worker_id="controller")
                for k, v in self.controller_overrides.items():
                    setattr(settings, k, v)
                self.controller = ControllerService(self.redis, settings)

    def start(self, ready_timeout: float = 15.0) -> SimCluster:
        self._build()
        services = [*self.verifiers, *self.drafters] + ([self.controller] if self.controller else [])
        for svc in services:
            name = getattr(svc, "me", None) or getattr(getattr(svc, "settings", None), "worker_id", "worker")
            th = threading.Thread(target=svc.run, args=(self.stop_event,), name=f"sim-{name}", daemon=True)
            th.start()
            self.threads.append(th)
        self.wait_ready(ready_timeout)
        log.info("simulated cluster up: %d verifiers, %d drafters%s, prefix %s, time scale %g", self.n_verifiers,
                 self.n_drafters, ", controller" if self.controller else "", self.prefix, self.time_scale)
        return self

    def wait_ready(self, timeout: float) -> None:
        streams = Streams(connect(self.redis), Keys(self.prefix))
        deadline = time.monotonic() + timeout
        try:
            while True:
                live = streams.live_workers()
                roles = Counter(info.get("role") for info in live.values())
                if roles["verifier"] >= self.n_verifiers and roles["drafter"] >= self.n_drafters:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"simulated workers did not come up in {timeout} s: {dict(roles)}")
                time.sleep(0.05)
        finally:
            streams.r.close()

    def stop(self, timeout: float = 15.0) -> None:
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for th in self.threads:
            th.join(max(0.1, deadline - time.monotonic()))
        alive = [th.name for th in self.threads if th.is_alive()]
        if alive:
            log.warning("simulated workers still running after %.0f s: %s", timeout, alive)
        self.threads = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> SimCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers --------------------------------------------------------------------------------------
    def reference(self, prompt: list[int], n: int) -> list[int]:
        """The target-only output: ``n`` tokens after ``prompt`` (what every run must produce)."""
        return self.model.continuation(prompt, n)

    def workers(self) -> dict[str, dict]:
        """Live workers' heartbeat info."""
        streams = Streams(connect(self.redis), Keys(self.prefix))
        try:
            return streams.live_workers()
        finally:
            streams.r.close()

    def counters(self) -> dict[str, dict]:
        """Every in-process service's counters right now (the heartbeat's info, without its delay)."""
        services = [*self.verifiers, *self.drafters] + ([self.controller] if self.controller else [])
        out = {}
        for svc in services:
            name = getattr(svc, "me", None) or svc.settings.worker_id
            for attempt in range(5):  # info() iterates counters its own thread may be updating
                try:
                    out[name] = svc.info()
                    break
                except RuntimeError:
                    time.sleep(0.001)
        return out

    def describe(self) -> dict:
        return {
            "verifiers": self.n_verifiers,
            "drafters": self.n_drafters,
            "experts_per_drafter": [list(s) for s in self.expert_sets],
            "target_cost": self.target_cost.name,
            "drafter_cost": self.drafter_cost.name,
            "controller": bool(self.controller),
            "controller_error": self.controller_error,
            "time_scale": self.time_scale,
            "scheduler_cost_model": "fitted to the simulated hardware" if self.cost_profile else "built-in",
            "switches": dict(self.switches.__dict__),
        }


# -- driving a workload ---------------------------------------------------------------------------------
def _ms(v: float | None) -> float | None:
    return None if v is None else round(1000 * v, 2)


def run_workload(cluster: SimCluster, n_requests: int, concurrency: int | None = None,
                 rate: float | Callable[[float], float] | None = None,
                 domain_mix: dict[str, float] | None = None, max_new_tokens: int = 64,
                 prompt_len: tuple[int, int] = (32, 128), seed: int = 0, timeout: float = 300.0,
                 **request) -> dict:
    """Send ``n_requests`` through the producer client, closed loop at ``concurrency`` (each client sends its
    next request when the previous ends) or open loop at ``rate`` requests/s (Poisson arrivals; a function
    of the seconds since the start for a rate that changes).

    Returns throughput, TTFT p50, per-token latency p50/p99 (ms), mean acceptance length overall and per
    domain, worker counters over the run, ``lossless`` (every output of a request that did not end with an
    error equals the target-only continuation; ``mismatches`` lists those that do not) and ``errors`` (the
    requests that ended with one, which ``completed`` leaves out)."""
    from cosine.client import Client

    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
    workload = SimWorkload(domain_mix or {d: 1.0 for d in DOMAINS}, prompt_len, cluster.model.vocab_size, seed)
    prompts = workload.prompts(n_requests)
    timings: list[RequestTiming | None] = [None] * n_requests
    outputs: list[list[int]] = [[] for _ in range(n_requests)]
    finals: list[dict] = [{} for _ in range(n_requests)]
    errors: list[tuple[int, str]] = []

    def one(client: Client, i: int) -> None:
        t = RequestTiming(time.perf_counter())
        try:
            for chunk in client.stream(prompts[i].ids, max_new_tokens=max_new_tokens, ignore_eos=True,
                                       timeout=timeout, **request):
                if chunk.token_ids and t.first is None:
                    t.first = time.perf_counter()
                outputs[i].extend(chunk.token_ids)
                t.tokens += len(chunk.token_ids)
                if chunk.finished:
                    finals[i] = chunk.stats or {}
        except Exception as exc:  # noqa: BLE001 - reported in the result
            errors.append((i, f"{type(exc).__name__}: {exc}"))
        t.end = time.perf_counter()
        timings[i] = t

    before = cluster.counters()
    t0 = time.perf_counter()
    threads: list[threading.Thread] = []
    if concurrency is not None:
        counter = itertools.count()
        lock = threading.Lock()

        def client_loop() -> None:
            with Client(settings=cluster.redis) as c:
                while True:
                    with lock:
                        i = next(counter)
                    if i >= n_requests:
                        return
                    one(c, i)

        threads = [threading.Thread(target=client_loop, name=f"sim-client-{j}")
                   for j in range(min(concurrency, n_requests))]
        for th in threads:
            th.start()
    else:
        rate_at = rate if callable(rate) else (lambda _t: rate)
        if not callable(rate) and not rate > 0:
            raise ValueError("rate must be > 0 requests/s")

        def open_one(i: int) -> None:
            with Client(settings=cluster.redis) as c:
                one(c, i)

        t0 = poisson_arrivals(n_requests, rate_at, open_one, seed + 1, name="sim-client")
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    after = cluster.counters()

    done = [t for t in timings if t is not None]
    tpots = [t.tpot for t in done if t.tpot is not None]
    ttfts = [t.ttft for t in done]
    total = SpecStats()
    by_domain: dict[str, SpecStats] = {}
    used: Counter = Counter()
    mismatches = []
    failed = {i for i, _ in errors}  # ended with an error: reported as errors, their outputs are not compared
    for i, (p, t, out, final) in enumerate(zip(prompts, timings, outputs, finals)):
        s = SpecStats(drafts=final.get("drafts", 0), drafted=final.get("drafted", 0),
                      accepted=final.get("accepted", 0), plain_steps=final.get("plain_steps", 0))
        total.merge(s)
        by_domain.setdefault(p.domain, SpecStats()).merge(s)
        used.update(final.get("tokens_by_drafter", {}))
        if i not in failed and (t is None or out != cluster.reference(p.ids, max_new_tokens)):
            mismatches.append(i)

    def delta(wid: str, key: str) -> float:
        return float(after.get(wid, {}).get(key, 0) or 0) - float(before.get(wid, {}).get(key, 0) or 0)

    vids = [w for w, info in after.items() if info.get("role") == "verifier"]
    dids = [w for w, info in after.items() if info.get("role") == "drafter"]
    rounds = sum(delta(w, "rounds") for w in vids)
    tokens = sum(t.tokens for t in done)
    return {
        "requests": n_requests,
        "completed": len(done) - len(errors),
        "errors": errors[:10],
        "mode": f"closed loop, concurrency {concurrency}" if concurrency is not None else "open loop",
        "max_new_tokens": max_new_tokens,
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "throughput_tok_s": round(tokens / wall, 2) if wall else 0.0,
        "ttft_p50_ms": _ms(statistics.median(ttfts)) if ttfts else None,
        "tpot_p50_ms": _ms(percentile(tpots, 0.5)) if tpots else None,
        "tpot_p99_ms": _ms(percentile(tpots, 0.99)) if tpots else None,
        "tpots_ms": sorted(_ms(t) for t in tpots),  # every request's, for pooling across runs
        "mean_acceptance_length": round(total.mean_acceptance_length, 3) if total.drafts else None,
        "acceptance_rate": round(total.acceptance_rate, 3) if total.drafts else None,
        "plain_steps": total.plain_steps,
        "mean_acceptance_length_by_domain": {d: round(s.mean_acceptance_length, 3)
                                             for d, s in sorted(by_domain.items()) if s.drafts},
        "tokens_by_drafter_model": dict(used),
        "verifier_busy": round(sum(delta(w, "busy_s") for w in vids) / (wall * max(1, len(vids))), 3),
        "drafter_busy": round(sum(delta(w, "busy_s") for w in dids) / (wall * max(1, len(dids))), 3),
        "drafters_used": sum(1 for w in dids if delta(w, "jobs") > 0),
        "verify_rounds": int(rounds),
        "late_drafts": int(sum(delta(w, "late_drafts") for w in vids)),
        "lookahead_hits": int(sum(delta(w, "lookahead_hits") for w in dids)),
        "stale_drafts": int(sum(delta(w, "stale_drafts") for w in vids)),
        "control_version": max((int(float(after[w].get("control_version", 0) or 0)) for w in vids), default=0),
        "controller_decisions": int(sum(delta(w, "decisions") for w, i in after.items()
                                        if i.get("role") == "controller")),
        "lossless": not mismatches,
        "mismatches": mismatches,
        "cluster": cluster.describe(),
    }
