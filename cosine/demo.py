"""``cosine demo``: the whole pipeline on an embedded Redis with a mixed-domain workload, then a summary."""

from __future__ import annotations

import time
from collections import Counter

import click
import torch
from tqdm.auto import tqdm

from cosine import defaults
from cosine.zoo import paths


def _workload(zoo_path: str | None, per_domain: int) -> list[tuple[str, str]]:
    prompts = paths.load_prompts(paths.zoo_dir(zoo_path))
    return [(domain, texts[i]) for i in range(per_domain) for domain, texts in sorted(prompts.items()) if i < len(texts)]


def run_demo(zoo_path: str | None, per_domain: int, max_new_tokens: int, drafters: int, log_dir: str) -> None:
    from cosine.broker import connect
    from cosine.client import Client
    from cosine.deployment import Deployment, WorkerSpec
    from cosine.keys import Keys
    from cosine.local_redis import port_or_free
    from cosine.service.control_view import ControlView

    work = _workload(zoo_path, per_domain)
    specs = [WorkerSpec("verifier", "verifier-0")] + [WorkerSpec("drafter", f"drafter-{i}") for i in range(drafters)]
    specs.append(WorkerSpec("controller", "controller"))
    port = port_or_free(defaults.DASHBOARD_PORT)
    specs.append(WorkerSpec("dashboard", "dashboard", ["--port", str(port)]))
    click.echo(f"starting a private Redis, 1 verifier, {drafters} drafter process(es), the controller and the "
               f"dashboard; logs in {log_dir}")
    t_start = time.perf_counter()
    with Deployment(specs, log_dir=log_dir, zoo=zoo_path) as dep:
        click.echo(f"up in {time.perf_counter() - t_start:.1f} s at {dep.url}; dashboard (while the demo runs): "
                   f"http://127.0.0.1:{port}/")
        click.echo(f"submitting {len(work)} requests")
        with Client(dep.url) as client:
            t0 = time.perf_counter()
            ids = [client.submit(text, max_new_tokens=max_new_tokens) for _, text in work]
            results = [client.result(rid) for rid in tqdm(ids, desc="requests", unit="req")]
            wall = time.perf_counter() - t0
        for (domain, prompt), res in zip(work, results):
            st = res.stats
            by = st.get("tokens_by_drafter") or {}
            expert = max(by, key=by.get) if by else "-"
            click.secho(f"--- [{domain}] expert={expert} acceptance length {st.get('mean_acceptance_length', 1):.2f} "
                        f"({res.finish_reason})", fg="cyan")
            click.echo(prompt.rstrip("\n")[-160:], nl=False)
            click.secho(res.text, fg="green")
        tokens = sum(len(r.token_ids) for r in results)
        drafts = sum(r.stats.get("drafts", 0) for r in results)
        accepted = sum(r.stats.get("accepted", 0) for r in results)
        drafted = sum(r.stats.get("drafted", 0) for r in results)
        shares = Counter()
        for r in results:
            shares.update(r.stats.get("tokens_by_drafter") or {})
        total_share = sum(shares.values()) or 1
        click.echo("")
        click.echo(f"requests     : {len(results)} ({Counter(r.finish_reason for r in results)})")
        click.echo(f"throughput   : {tokens / wall:.1f} tokens/s ({tokens} tokens in {wall:.2f} s, all concurrent)")
        click.echo(f"acceptance   : mean length {1 + accepted / max(drafts, 1):.2f}, "
                   f"rate {accepted / max(drafted, 1):.2f}")
        click.echo("expert share : " + ", ".join(f"{k} {v / total_share:.0%}" for k, v in sorted(shares.items())))
        hits = sum(r.stats.get("lookahead_hits", 0) for r in results)
        click.echo(f"lookahead    : {hits} of {drafts} drafts were ready before their job arrived")
        decision = ControlView(connect(dep.redis_settings()), Keys(dep.prefix)).current()
        if decision is not None:
            click.echo(f"controller   : decision v{decision.version}: k {decision.k_min}..{decision.k_max}, up to "
                       f"{decision.max_cooperating} drafters cooperating ({decision.reason})")
        click.echo("stopping the deployment ...")
    click.echo("done")


def run_local_demo(zoo_path: str | None, per_domain: int, max_new_tokens: int, threads: int = 2) -> None:
    """Single process: the target alone, then coupled speculative decoding, on the same prompts."""
    from cosine.engine.sequence import SpecStats
    from cosine.engine.speculative import SpecConfig, SpeculativeEngine
    from cosine.sampling_params import SamplingParams

    torch.set_num_threads(threads)
    engine = SpeculativeEngine.from_zoo(zoo_path, config=SpecConfig(k=4, tree_width=2))
    work = _workload(zoo_path, per_domain)
    texts = [t for _, t in work]
    params = SamplingParams(max_new_tokens=max_new_tokens)
    engine.generate(texts[:1], SamplingParams(max_new_tokens=4))  # warm-up
    t0 = time.perf_counter()
    plain = engine.generate(texts, params, speculative=False)
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    spec = engine.generate(texts, params)
    t_spec = time.perf_counter() - t0
    total = SpecStats()
    for (domain, prompt), s, p in zip(work, spec, plain):
        total.merge(s.stats)
        click.secho(f"--- [{domain}] drafter={s.drafter} acceptance length {s.stats.mean_acceptance_length:.2f}",
                    fg="cyan")
        click.echo(prompt.rstrip("\n")[-160:], nl=False)
        click.secho(engine.text(s), fg="green")
        if s.output_ids != p.output_ids:
            click.secho("  (differs from the target alone)", fg="red")
    n_plain = sum(len(s.output_ids) for s in plain)
    n_spec = sum(len(s.output_ids) for s in spec)
    same = sum(s.output_ids == p.output_ids for s, p in zip(spec, plain))
    shares = {k: v / max(1, sum(total.tokens_by_drafter.values())) for k, v in total.tokens_by_drafter.items()}
    click.echo("")
    click.echo(f"target alone : {n_plain / t_plain:7.1f} tokens/s ({n_plain} tokens, {t_plain:.2f} s)")
    click.echo(f"speculative  : {n_spec / t_spec:7.1f} tokens/s ({n_spec} tokens, {t_spec:.2f} s), "
               f"{t_plain / t_spec:.2f}x")
    click.echo(f"acceptance   : mean length {total.mean_acceptance_length:.2f}, rate {total.acceptance_rate:.2f}")
    click.echo("drafter share: " + ", ".join(f"{k} {v:.0%}" for k, v in sorted(shares.items())))
    click.echo(f"identical to the target alone: {same}/{len(spec)}")
