"""``cosine bench e2e``: CoSine against what a user would run instead, closed loop, in one run.

Systems at each concurrency level ``c`` (closed loop: each of ``c`` clients sends its next request when
the previous one finishes):

* ``pipeline``    — CoSine: a verifier, a drafter (the zoo's experts) and the controller as separate
                    processes over a private Redis, driven by the producer client;
* ``hf-generate``, ``hf-batched``, ``hf-assisted`` — Hugging Face ``generate`` in this process: batch 1,
                    static left-padded batches of ``c``, assisted generation with the prompt's own drafter
                    (:mod:`cosine.bench.hf_baselines`);
* ``target-only``, ``coupled`` — the project's own single-process engine loops (ablations beside them).

Placement (:mod:`cosine.bench.pinning`): by default the verifier runs pinned to the first core and the
drafter to the second, one torch thread per core; Redis, the controller and this process's client
threads go on the drafter's core. The baselines run twice, labelled: pinned to the verifier's cores
(**node-emulated**: does adding a drafter node pay?) and on every core the deployment uses (**equal
compute**); the engine loops run in the equal-compute placement. ``--cpus none`` pins nothing (equal compute
only).

Every system decodes the same held-out mixed-domain prompts greedily to the same length, end-of-text
ignored. Each system's outputs are compared with the target alone's (HF ``generate``, batch 1) token for
token. The comparisons the issue sets targets for run again afterwards, alternated (``repeats``), and the
targets use the pooled runs. Each pipeline row carries the verifier's pass breakdown
(:mod:`cosine.bench.counters`) and its distance from the physical limit (:mod:`cosine.bench.versus`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from cosine.bench.counters import fresh_counters, pipeline_counters
from cosine.bench.hf_baselines import HF_PATHS, HFBaselines
from cosine.bench.pinning import EQUAL, Layout, allowed_cpus, format_cpus, parse_layout, pinned, view_cpus, views
from cosine.bench.repeats import run_repeats
from cosine.bench.report import environment
from cosine.bench.timing import RequestTiming, summarize
from cosine.bench.versus import add_limits, closed, hf_name, rivals, versus
from cosine.engine.sequence import Sequence, SpecStats
from cosine.sampling_params import SamplingParams
from cosine.zoo import paths

log = logging.getLogger(__name__)

ENGINE_PATHS = ("target-only", "coupled")
PATHS = ("pipeline", *HF_PATHS, *ENGINE_PATHS)


@dataclass
class E2EBenchConfig:
    zoo: str | None = None
    concurrency: tuple[int, ...] = (1, 4, 8, 16)
    requests_per_client: int = 3
    min_requests: int = 12
    max_new_tokens: int = 64
    k: int = 4
    tree_width: int = 1
    worker_threads: int = 1  # pipeline workers' torch threads when nothing is pinned (else one per core)
    paths: tuple[str, ...] = PATHS
    cpus: tuple[str, ...] = ()  # ROLE=CPUS items (pinning.parse_layout); (): verifier core 0, drafter 1
    # After the sweep, CoSine against each baseline it has a target against runs again this many times per
    # system, alternated (cosine.bench.repeats); the targets use the pooled runs. 0: the sweep's cells.
    repeats: int = 5
    controller: bool = True


def mixed_prompts(zoo, n: int) -> list[str]:
    """``n`` held-out prompts, the domains interleaved; a shorter list is a prefix of a longer one."""
    by_domain = paths.load_prompts(zoo)
    mixed = [texts[i] for i in range(max(len(t) for t in by_domain.values())) for _, texts in sorted(by_domain.items())
             if i < len(texts)]
    return (mixed * (n // len(mixed) + 1))[:n]


def run_inprocess(engine, prompts: list[str], concurrency: int, params: SamplingParams, speculative: bool,
                  outputs: dict[int, list[int]] | None = None) -> dict:
    """Closed loop on the single-process engine with continuous batching; fills ``outputs`` by prompt index."""
    ids = [engine.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    drafters = engine.choose_drafters(ids) if speculative else [None] * len(ids)
    queue = list(range(len(ids)))
    active: list[Sequence] = []
    timing: dict[str, RequestTiming] = {}
    index: dict[str, int] = {}
    stats = SpecStats()
    t0 = time.perf_counter()
    while queue or active:
        new = []
        while queue and len(active) + len(new) < concurrency:
            i = queue.pop(0)
            seq = Sequence(ids[i], params, drafter=drafters[i])
            timing[seq.seq_id], index[seq.seq_id] = RequestTiming(time.perf_counter()), i
            new.append(seq)
        if new:
            engine.verifier.admit(new)
            active += new
        engine.run_round(active)
        now = time.perf_counter()
        done = []
        for seq in active:
            t = timing[seq.seq_id]
            if seq.output_ids and t.first is None:
                t.first = now
            t.tokens = len(seq.output_ids)
            if seq.finished:
                t.end = now
                stats.merge(seq.stats)
                done.append(seq)
                if outputs is not None:
                    outputs[index[seq.seq_id]] = list(seq.output_ids)
        if done:
            engine.release([s.seq_id for s in done])
            active = [s for s in active if not s.finished]
    return summarize(list(timing.values()), time.perf_counter() - t0, stats)


def stream_one(client, prompt, params: SamplingParams, sink: list[int] | None = None,
               **request) -> tuple[RequestTiming, dict]:
    """Send one request through the producer client and time it; returns its timing and final stats, and
    appends its tokens to ``sink``."""
    t = RequestTiming(time.perf_counter())
    final: dict = {}
    for chunk in client.stream(prompt, max_new_tokens=params.max_new_tokens, ignore_eos=params.ignore_eos, **request):
        if chunk.token_ids and t.first is None:
            t.first = time.perf_counter()
        t.tokens += len(chunk.token_ids)
        if sink is not None:
            sink += chunk.token_ids
        if chunk.finished:
            final = chunk.stats or {}
    t.end = time.perf_counter()
    return t, final


def spec_stats(final: dict) -> SpecStats:
    return SpecStats(drafts=final.get("drafts", 0), drafted=final.get("drafted", 0), accepted=final.get("accepted", 0))


def run_pipeline(url: str, prompts: list[str], concurrency: int, params: SamplingParams,
                 outputs: dict[int, list[int]] | None = None, **request) -> dict:
    """Closed loop through the producer client: ``concurrency`` threads, each streaming its requests; fills
    ``outputs`` by prompt index."""
    from cosine.client import Client

    shares = [list(range(len(prompts)))[i::concurrency] for i in range(concurrency)]
    timings: list[RequestTiming] = []
    stats = SpecStats()
    lock = threading.Lock()
    errors: list[Exception] = []

    def client_loop(mine: list[int]) -> None:
        try:
            with Client(url) as c:
                for i in mine:
                    sink: list[int] = []
                    t, final = stream_one(c, prompts[i], params, sink, **request)
                    with lock:
                        timings.append(t)
                        stats.merge(spec_stats(final))
                        if outputs is not None:
                            outputs[i] = sink
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client_loop, args=(s,)) for s in shares if s]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return summarize(timings, time.perf_counter() - t0, stats)


def pipeline_specs(layout: Layout | None, verifier_args: list[str], drafter_args: list[str], controller: bool,
                   threads: int = 1) -> list:
    """One verifier, one drafter (and the controller), each pinned to its role's cores with one torch thread
    per core; the controller goes on the drafter's cores. Without a layout: unpinned, ``threads`` each."""
    from cosine.deployment import WorkerSpec

    def spec(role: str, name: str, args: list[str]) -> WorkerSpec:
        cpus = layout["drafter" if role == "controller" else role] if layout else None
        return WorkerSpec(role, name, args, len(cpus) if cpus else threads, cpus=cpus)

    specs = [spec("verifier", "verifier-0", verifier_args), spec("drafter", "drafter-0", drafter_args)]
    return specs + ([spec("controller", "controller-0", [])] if controller else [])


def placement(dep, layout: Layout | None) -> dict[str, str]:
    """Where each process of a deployment may run, read back from the OS (not from the request for it)."""
    procs = {name: p.pid for name, p in dep.procs.items()}
    if dep.local is not None and dep.local.proc is not None:
        procs["redis"] = dep.local.proc.pid
    out = {name: format_cpus(allowed_cpus(pid)) for name, pid in procs.items()}
    with client_side(layout):
        out["client"] = format_cpus(allowed_cpus())
    return out


def client_side(layout: Layout | None):
    """This process on the drafter's cores while it drives the pipeline (with Redis and the controller)."""
    return pinned(layout["drafter"]) if layout else contextlib.nullcontext()


class _E2ERun:
    """One benchmark run's state: the placement, the baselines' models, the reference outputs."""

    def __init__(self, cfg: E2EBenchConfig, bar) -> None:
        self.cfg, self.bar = cfg, bar
        self.zoo = paths.zoo_dir(cfg.zoo)
        self.layout = parse_layout(cfg.cpus)
        self.views = views(self.layout)
        self.params = SamplingParams(max_new_tokens=cfg.max_new_tokens, ignore_eos=True)
        self.n_for = {c: max(cfg.min_requests, cfg.requests_per_client * c) for c in {1, *cfg.concurrency}}
        self.prompts = mixed_prompts(self.zoo, max(self.n_for.values()))
        self.hf = HFBaselines(self.zoo)
        self.reference: dict[int, list[int]] = {}
        self.url: str | None = None

    def row(self, system: str, c: int, row: dict, outputs: dict, reference: bool = False, **extra) -> dict:
        if reference:
            row["output_match"] = {"reference": True}
        elif self.reference:
            row["output_match"] = self.hf.compare(outputs, self.reference, self.prompts)
        self.bar.update(1)
        return {"system": system, "workload": closed(c), "concurrency": c, **extra, **row}

    def hf_cells(self) -> list[tuple[str, int]]:
        cells = [(p, 1) for p in ("hf-generate", "hf-assisted") if p in self.cfg.paths]
        return cells + [("hf-batched", c) for c in self.cfg.concurrency if c > 1 and "hf-batched" in self.cfg.paths]

    def run_hf(self, path: str, view: str, c: int, outputs: dict | None = None) -> dict:
        cpus = view_cpus(self.layout, view)
        with pinned(cpus):
            return self.hf.run(path, self.prompts[: self.n_for[c]], c, self.cfg.max_new_tokens, outputs)

    def baselines(self) -> list[dict]:
        rows = []
        for view in self.views:
            cpus = view_cpus(self.layout, view)
            with pinned(cpus):
                self.hf.warm_up(self.prompts)
            for path, c in self.hf_cells():
                self.bar.set_postfix_str(f"{path} ({view}) c={c}")
                outputs: dict[int, list[int]] = {}
                row = self.run_hf(path, view, c, outputs)
                first = path == "hf-generate" and not self.reference
                if first:
                    self.reference = dict(outputs)  # the target alone, batch 1: what every path must match
                rows.append(self.row(hf_name(path, view), c, row, outputs, first, path=path, view=view,
                                     cpus=format_cpus(cpus), threads=len(cpus)))
        if not self.reference:  # no HF generate among the paths: the reference, untimed
            with pinned(view_cpus(self.layout, EQUAL)):
                self.hf.run("hf-generate", self.prompts[: self.n_for[1]], 1, self.cfg.max_new_tokens, self.reference)
        return rows

    def engine_paths(self) -> list[dict]:
        from cosine.engine.speculative import SpecConfig, SpeculativeEngine

        cpus = view_cpus(self.layout, EQUAL)
        rows = []
        with pinned(cpus):
            engine = SpeculativeEngine.from_zoo(self.zoo, device="cpu", dtype="float32",
                                                config=SpecConfig(k=self.cfg.k, tree_width=self.cfg.tree_width))
            engine.generate(self.prompts[:2], SamplingParams(max_new_tokens=8))
            for path in (p for p in ENGINE_PATHS if p in self.cfg.paths):
                for c in self.cfg.concurrency:
                    self.bar.set_postfix_str(f"{path} c={c}")
                    outputs: dict[int, list[int]] = {}
                    row = run_inprocess(engine, self.prompts[: self.n_for[c]], c, self.params, path == "coupled",
                                        outputs)
                    rows.append(self.row(path, c, row, outputs, path=path, view=EQUAL, cpus=format_cpus(cpus),
                                         threads=len(cpus)))
        return rows

    def measure_pipeline(self, c: int, outputs: dict | None = None) -> dict:
        """One closed-loop run with the heartbeats that bracket it (:func:`fresh_counters`)."""
        with client_side(self.layout):
            before = fresh_counters(self.url)
            t0 = time.perf_counter()
            row = run_pipeline(self.url, self.prompts[: self.n_for[c]], c, self.params, outputs)
            wall = time.perf_counter() - t0
            after = fresh_counters(self.url)
        return {**row, **pipeline_counters(before, after, wall)}

    def pipeline(self) -> list[dict]:
        cpus = "unpinned" if not self.layout else (f"verifier {format_cpus(self.layout['verifier'])}, drafter "
                                                   f"{format_cpus(self.layout['drafter'])}")
        rows = []
        for c in self.cfg.concurrency:
            self.bar.set_postfix_str(f"pipeline c={c}")
            outputs: dict[int, list[int]] = {}
            row = self.measure_pipeline(c, outputs)
            rows.append(self.row("pipeline", c, row, outputs, path="pipeline", view=None, cpus=cpus,
                                 threads=None if self.layout else self.cfg.worker_threads))
        return rows

    def repeat(self, results: list[dict]) -> list[dict]:
        """The targets' comparisons again, alternated (:func:`cosine.bench.repeats.run_repeats`)."""
        names = {hf_name(p, v): (p, v) for p in HF_PATHS for v in self.views}

        def measure(system: str, workload: str, r: int) -> dict:
            c = int(workload.rsplit("=", 1)[1])
            if system == "pipeline":
                return self.measure_pipeline(c)
            return self.run_hf(*names[system], c)

        return run_repeats(rivals(results, "pipeline", self.views), self.cfg.repeats, measure, self.bar)


def run_e2e_bench(cfg: E2EBenchConfig, progress: bool = True) -> dict:
    from cosine.deployment import Deployment

    unknown = [p for p in cfg.paths if p not in PATHS]
    if unknown:
        from cosine.errors import InvalidParameterError

        raise InvalidParameterError("paths", f"unknown {unknown}; choose from {list(PATHS)}")
    bar = tqdm(total=0, desc="bench", unit="run", disable=not progress)
    run = _E2ERun(cfg, bar)
    bar.total = len(run.views) * len(run.hf_cells()) + len(cfg.concurrency) * sum(
        p in cfg.paths for p in ("pipeline", *ENGINE_PATHS))
    results: list[dict] = []
    repeats: list[dict] = []
    where: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        if "pipeline" in cfg.paths:
            specs = pipeline_specs(run.layout, ["--k", str(cfg.k), "--tree-width", str(cfg.tree_width)], [],
                                   cfg.controller, cfg.worker_threads)
            dep = stack.enter_context(Deployment(specs, device="cpu", dtype="float32", zoo=cfg.zoo,
                                                 redis_cpus=run.layout["drafter"] if run.layout else None))
            run.url = dep.url
            where = placement(dep, run.layout)
            with client_side(run.layout):
                run_pipeline(dep.url, run.prompts[:4], 2, SamplingParams(max_new_tokens=8))  # warm-up
        results += run.baselines()
        if any(p in cfg.paths for p in ENGINE_PATHS):
            results += run.engine_paths()
        if "pipeline" in cfg.paths:
            results += run.pipeline()
            if cfg.repeats:
                repeats = run.repeat(results)
    bar.close()
    hf_rate = add_limits(results, ["pipeline"], run.views)
    from cosine.bench.e2e_report import e2e_targets

    return {
        "benchmark": "e2e",
        "environment": environment(),
        "config": {**asdict(cfg), "zoo": str(run.zoo), "views": list(run.views),
                   "layout": {r: format_cpus(c) for r, c in (run.layout or {}).items()},
                   "eos": f"ignored: HF gets eos_token_id={run.hf.never} (outside the vocabulary), CoSine and the "
                          "engine ignore_eos", "reference": "hf-generate, batch 1, first view"},
        "placement": where,
        "hf_assisted_drafters": {d: n for d, n in sorted(Counter(run.hf.drafter_for(run.prompts[: run.n_for[1]])).items())},
        "physical_limit": hf_rate,
        "results": results,
        "repeats": repeats,
        "versus": versus(results, "pipeline", run.views, cfg.concurrency),
        "targets": e2e_targets(results, repeats, run.views),
    }
