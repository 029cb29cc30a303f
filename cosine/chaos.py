"""``cosine chaos``: a real local deployment under a steady mixed workload while a seeded injector breaks it.

Two verifiers, three drafters and a controller (worker processes) over a private Redis with AOF ``everysec``.
Client threads run a closed loop of greedy and seeded-sampling requests; an injector picks a fault every few
seconds (every kind once first, then at random, all from ``seed``) and logs it:

* ``kill_verifier`` / ``kill_drafter`` / ``kill_controller``: SIGKILL, restarted under the same name after a
  moment (a restarted verifier finds its own pending requests);
* ``stop_verifier``: SIGSTOP past the heartbeat timeout (its requests are taken over), then SIGCONT;
* ``restart_redis``: SIGKILL of redis-server and a restart from its append-only file;
* ``remove_drafter``: a drafter stopped for good (while more than one is left).

Afterwards every request is checked: it completed or ended with an explicit :class:`~cosine.errors.RequestError`
(never another exception, never a hang); greedy outputs equal the target alone's (a divergence is a named
near-tie when the target's two tokens score within ``NEAR_TIE_LOGIT_GAP``) and seeded samples equal
speculation off (a named near-tie when the keyed uniform lies within ``NEAR_TIE_CDF`` of a boundary of the
target's distribution); the client's assembler already refuses a stream with a gap. Then that nothing is left
behind: no request entry pending, no worker holding a request, every output stream expiring.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field

import redis

from cosine import defaults
from cosine.broker import RedisSettings, Streams, connect
from cosine.client import Client
from cosine.errors import RequestError
from cosine.keys import Keys
from cosine.local_redis import LocalRedis
from cosine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

FAULTS = ("kill_verifier", "kill_drafter", "stop_verifier", "restart_redis", "kill_controller", "remove_drafter")
NEAR_TIE_LOGIT_GAP = 1e-3
NEAR_TIE_CDF = 1e-5  # a keyed sample whose uniform lies this close to a boundary of the target's CDF
SEEDS = 8  # sampling seeds the workload cycles through (each prompt and seed: one reference to compute)


@dataclass
class ChaosConfig:
    seed: int = 0
    duration_s: float = 60.0
    verifiers: int = 2
    drafters: int = 3
    clients: int = 4
    max_new_tokens: int = 32
    fault_every_s: tuple[float, float] = (3.0, 8.0)  # the injector waits a random time in this range
    request_timeout_s: float = 180.0
    zoo: str | None = None
    log_dir: str | None = None


@dataclass
class _Outcome:
    index: int  # which prompt of the workload
    sampled: bool
    seed: int
    tokens: list[int] | None = None
    error: str | None = None  # an explicit RequestError (its class)
    detail: str = ""  # its message
    lost: str | None = None  # anything else: an exception that is not a RequestError


@dataclass
class _Run:
    cfg: ChaosConfig
    rng: random.Random
    faults: list[dict] = field(default_factory=list)
    outcomes: list[_Outcome] = field(default_factory=list)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    injected: set[int] = field(default_factory=set)  # pids the injector killed or stopped on purpose
    refused: int = 0  # submits that failed (Redis down): never accepted, retried
    lock: threading.Lock = field(default_factory=threading.Lock)


def rss_mb(pid: int) -> float:
    """A process's resident memory in MB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _client_loop(run: _Run, url: str, prompts: list[str], stop: threading.Event, start: int) -> None:
    """Closed loop until ``stop``: submit, then read the result. A submit that fails (Redis down) was never
    accepted and is retried; once accepted, a request must end with its output or a RequestError."""
    i = start
    with Client(url, require_workers=False) as c:
        while not stop.is_set():
            index = i % len(prompts)
            sampled = i % 2 == 1
            seed = 1000 + i % SEEDS  # a few seeds, so the references stay few on a long run
            params = dict(max_new_tokens=run.cfg.max_new_tokens, timeout=run.cfg.request_timeout_s)
            if sampled:
                params.update(temperature=0.8, seed=seed)
            try:
                rid = c.submit(prompts[index], **params)
            except (redis.RedisError, RequestError):
                with run.lock:
                    run.refused += 1
                stop.wait(0.5)
                continue
            out = _Outcome(index, sampled, seed)
            try:
                out.tokens = c.result(rid, timeout=run.cfg.request_timeout_s).token_ids
            except RequestError as exc:
                out.error, out.detail = type(exc).__name__, str(exc)[:200]
            except Exception as exc:  # noqa: BLE001 - anything but an explicit error is a lost request
                out.lost = f"{type(exc).__name__}: {exc}"
            with run.lock:
                run.outcomes.append(out)
            i += run.cfg.clients


def _inject(run: _Run, dep, server: LocalRedis, stop: threading.Event) -> None:
    """Faults until ``stop``: every kind once (in a seeded order), then at random."""
    order = list(FAULTS)
    run.rng.shuffle(order)
    removed: set[str] = set()
    t0 = time.monotonic()
    while not stop.wait(run.rng.uniform(*run.cfg.fault_every_s)):
        kind = order.pop(0) if order else run.rng.choice(FAULTS)
        verifiers = [s for s in dep.specs if s.role == "verifier"]
        drafters = [s for s in dep.specs if s.role == "drafter" and s.name not in removed]
        target = ""
        if kind in ("kill_verifier", "stop_verifier"):
            target = run.rng.choice(verifiers).name
        elif kind in ("kill_drafter", "remove_drafter"):
            if kind == "remove_drafter" and len(drafters) < 2:
                kind = "kill_drafter"
            target = run.rng.choice(drafters).name
        elif kind == "kill_controller":
            target = "controller-0"
        run.faults.append({"t_s": round(time.monotonic() - t0, 2), "fault": kind, "target": target})
        log.info("chaos: %s %s", kind, target)
        if kind == "restart_redis":
            server.restart(kill=True)
            continue
        proc = dep.procs[target]
        run.injected.add(proc.pid)
        if kind == "stop_verifier":
            os.kill(proc.pid, signal.SIGSTOP)
            stop.wait(defaults.WORKER_DEAD_AFTER_S + 2.0)
            os.kill(proc.pid, signal.SIGCONT)
            continue
        dep.kill(target, signal.SIGTERM if kind == "remove_drafter" else signal.SIGKILL)
        if kind == "remove_drafter":
            removed.add(target)
            continue
        stop.wait(run.rng.uniform(0.5, 2.0))
        dep.start_worker(next(s for s in dep.specs if s.name == target))


def _watch_memory(run: _Run, dep, server: LocalRedis, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        for name, proc in list(dep.procs.items()):
            run.peak_rss_mb[name] = max(run.peak_rss_mb.get(name, 0.0), rss_mb(proc.pid))
        if server.proc is not None:
            run.peak_rss_mb["redis"] = max(run.peak_rss_mb.get("redis", 0.0), rss_mb(server.proc.pid))


def _references(cfg: ChaosConfig, prompts: list[str], outcomes: list[_Outcome]) -> dict:
    """The target alone's outputs for every (prompt, sampling) the run used; greedy divergences classified."""
    import torch

    from cosine.engine.sampling import TARGET_SAMPLE, cdf_margin, keyed_uniform, probabilities
    from cosine.engine.speculative import SpeculativeEngine

    engine = SpeculativeEngine.from_zoo(cfg.zoo, device="cpu", dtype="float32", drafters=[])
    model = engine.verifier.runner.model
    tok = engine.tokenizer
    want: dict[tuple[int, bool, int], list[int]] = {}
    counts = {"identical": 0, "near_ties": 0, "mismatched": 0, "compared": 0, "mismatched_greedy": 0,
              "mismatched_sampled": 0, "mismatch_samples": []}
    for out in outcomes:
        if out.tokens is None:
            continue
        key = (out.index, out.sampled, out.seed if out.sampled else 0)
        ids = tok(prompts[out.index], add_special_tokens=False)["input_ids"]
        if key not in want:
            params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.8 if out.sampled else 0.0,
                                    seed=out.seed if out.sampled else None)
            [seq] = engine.generate([ids], params, speculative=False)
            want[key] = seq.output_ids
        ref = want[key]
        counts["compared"] += 1
        if out.tokens == ref:
            counts["identical"] += 1
            continue
        pos = next((p for p, (a, b) in enumerate(zip(out.tokens, ref)) if a != b), None)
        if pos is not None:
            with torch.inference_mode():
                logits = model(torch.tensor([ids + ref[:pos]])).logits[0, -1]
            if out.sampled:  # the keyed uniform that close to a boundary of the target's distribution
                params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.8, seed=out.seed)
                tie = cdf_margin(probabilities(logits, params), keyed_uniform(out.seed, pos, TARGET_SAMPLE)) \
                    <= NEAR_TIE_CDF
            else:
                tie = abs(float(logits[ref[pos]] - logits[out.tokens[pos]])) <= NEAR_TIE_LOGIT_GAP
            if tie:
                counts["near_ties"] += 1
                continue
        counts["mismatched"] += 1
        counts["mismatched_sampled" if out.sampled else "mismatched_greedy"] += 1
        if len(counts["mismatch_samples"]) < 10:
            counts["mismatch_samples"].append({"prompt": out.index, "seed": out.seed if out.sampled else None,
                                               "position": pos, "lengths": [len(out.tokens), len(ref)]})
    return counts


def _leftovers(url: str, prefix: str, settle_s: float = 15.0) -> dict:
    """What a quiet deployment still holds once requests still running server-side (their client gave up on
    an explicit error) had ``settle_s`` to end: request entries, requests held by workers, output streams
    that would never expire."""
    r = connect(RedisSettings(url=url, prefix=prefix))
    keys, streams = Keys(prefix), Streams(r, Keys(prefix))
    deadline = time.monotonic() + settle_s
    while True:
        live = streams.live_workers()
        held = {role: sum(int(i.get("active", 0)) for i in live.values() if i.get("role") == role)
                for role in ("verifier", "drafter")}
        if not held["verifier"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    immortal = [k for k in r.scan_iter(match=f"{prefix}:out:*") if r.pttl(k) < 0]
    # A drafter whose close notice was lost (e.g. in Redis's last unsynced second) keeps that request's rows
    # until they are idle for DRAFTER_IDLE_EVICT_S.
    return {"request_entries": r.xlen(keys.requests), "held_by_verifiers": held["verifier"],
            "held_by_drafters_until_idle_eviction": held["drafter"],
            "output_streams_without_expiry": len(immortal), "keys": r.dbsize()}


def run_chaos(cfg: ChaosConfig, progress: bool = True) -> dict:
    """Run the deployment for ``duration_s`` under faults; returns the report (see the module docstring)."""
    from tqdm.auto import tqdm

    from cosine.bench.e2e_bench import mixed_prompts
    from cosine.deployment import Deployment, WorkerSpec

    run = _Run(cfg, random.Random(cfg.seed))
    prompts = mixed_prompts(cfg.zoo, 12)
    specs = ([WorkerSpec("verifier", f"verifier-{i}") for i in range(cfg.verifiers)]
             + [WorkerSpec("drafter", f"drafter-{i}") for i in range(cfg.drafters)]
             + [WorkerSpec("controller", "controller-0")])
    with LocalRedis(appendonly=True, appendfsync="everysec") as server, \
            Deployment(specs, redis_url=server.url, log_dir=cfg.log_dir, device="cpu", dtype="float32",
                       zoo=cfg.zoo) as dep:
        stop, done = threading.Event(), threading.Event()
        clients = [threading.Thread(target=_client_loop, args=(run, server.url, prompts, stop, i), daemon=True)
                   for i in range(cfg.clients)]
        helpers = [threading.Thread(target=_inject, args=(run, dep, server, done), daemon=True),
                   threading.Thread(target=_watch_memory, args=(run, dep, server, done), daemon=True)]
        for t in clients + helpers:
            t.start()
        with tqdm(total=int(cfg.duration_s), desc="chaos", unit="s", disable=not progress) as bar:
            end = time.monotonic() + cfg.duration_s
            while time.monotonic() < end:
                time.sleep(1.0)
                bar.update(1)
                bar.set_postfix(requests=len(run.outcomes), faults=len(run.faults))
        done.set()  # no more faults; the requests in flight finish
        stop.set()
        for t in helpers + clients:
            t.join(cfg.request_timeout_s + 30)
        hung = sum(t.is_alive() for t in clients)
        crashed = [n for n, p in dep.procs.items() if p.poll() is not None and p.pid not in run.injected]
        time.sleep(defaults.HEARTBEAT_INTERVAL_S * 4)
        left = _leftovers(server.url, dep.prefix)
        info = connect(RedisSettings(url=server.url)).info("memory")
        run.peak_rss_mb["redis_used_memory_peak"] = info.get("used_memory_peak", 0) / 2**20
    counts = _references(cfg, prompts, run.outcomes)
    errors: dict[str, int] = {}
    for out in run.outcomes:
        if out.error:
            errors[out.error] = errors.get(out.error, 0) + 1
    faults: dict[str, int] = {}
    for f in run.faults:
        faults[f["fault"]] = faults.get(f["fault"], 0) + 1
    return {
        "config": {**dataclasses.asdict(cfg), "faults": list(FAULTS)},
        "requests": len(run.outcomes),
        "submits_refused": run.refused,
        "completed": sum(o.tokens is not None for o in run.outcomes),
        "explicit_errors": errors,
        "explicit_error_samples": sorted({f"{o.error}: {o.detail}" for o in run.outcomes if o.error})[:10],
        "lost": sum(o.lost is not None for o in run.outcomes) + hung,
        "lost_reasons": [o.lost for o in run.outcomes if o.lost][:10],
        "outputs": counts,
        "faults": faults,
        "fault_log": run.faults,
        "worker_crashes": crashed,
        "leftovers": left,
        "peak_memory_mb": {k: round(v, 1) for k, v in run.peak_rss_mb.items()},
    }


def markdown(report: dict) -> str:
    """The results table the README shows."""
    o = report["outputs"]
    faults = ", ".join(f"{k} {v}" for k, v in sorted(report["faults"].items())) or "none"
    errors = ", ".join(f"{k} {v}" for k, v in sorted(report["explicit_errors"].items())) or "none"
    mem = report["peak_memory_mb"]
    workers = max((v for k, v in mem.items() if not k.startswith("redis")), default=0.0)
    rows = [
        ("duration", f"{report['config']['duration_s']:.0f} s, seed {report['config']['seed']}"),
        ("faults injected", faults),
        ("requests run", report["requests"]),
        ("completed", report["completed"]),
        ("ended with an explicit error", errors),
        ("lost (must be 0)", report["lost"]),
        ("mismatched outputs (must be 0)", f"{o['mismatched']} of {o['compared']} ({o['near_ties']} near-ties)"),
        ("worker crashes (must be 0)", len(report["worker_crashes"])),
        ("left behind at the end", ", ".join(f"{k} {v}" for k, v in report["leftovers"].items())),
        ("peak memory", f"largest worker {workers:.0f} MB RSS, redis-server {mem.get('redis', 0):.0f} MB RSS "
                        f"(used_memory_peak {mem.get('redis_used_memory_peak', 0):.1f} MB)"),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"
