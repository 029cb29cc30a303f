"""The ``cosine`` command line."""

from __future__ import annotations

import json
import logging
import pathlib
import sys
import time

import click

from cosine.errors import CosineError

log = logging.getLogger("cosine")

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # transformers prints weight-loading progress bars; keep the console for our own output.
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--log-level", default="INFO", show_default=True, help="DEBUG, INFO, WARNING or ERROR.")
def cli(log_level: str) -> None:
    """CoSine: collaborative speculative inference.

    Small domain drafters propose tokens, a large target model verifies them, and the output is exactly
    what the target alone would produce, only faster. Start with `cosine demo`.
    """
    _setup_logging(log_level)


# -- zoo ----------------------------------------------------------------------------------------------
@cli.group()
def zoo() -> None:
    """Build and evaluate the demo model zoo (tokenizer, target, domain drafters)."""


@zoo.command("build")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Zoo folder [default: zoo/ or $COSINE_ZOO].")
@click.option("--time-budget-min", type=float, default=90.0, show_default=True,
              help="Wall-clock budget; training steps are cut to fit it (the cut is recorded).")
@click.option("--evaluate/--no-evaluate", default=True, show_default=True,
              help="Measure perplexity, step times and acceptance, and write the model card.")
def zoo_build(out: str | None, time_budget_min: float, evaluate: bool) -> None:
    """Train the zoo from the standard library's own text, offline (about 80 minutes on 2 cores)."""
    from cosine.zoo.build import ZooSettings, build_zoo

    manifest = build_zoo(out, ZooSettings(time_budget_min=time_budget_min), evaluate=evaluate)
    click.echo(f"zoo built in {manifest['build_seconds'] / 60:.1f} min")


@zoo.command("evaluate")
@click.option("--zoo", "zoo_path", type=click.Path(file_okay=False), default=None, help="Zoo folder.")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads for the step timings.")
def zoo_evaluate(zoo_path: str | None, threads: int) -> None:
    """Re-measure the zoo and rewrite MODEL_CARD.md."""
    from cosine.zoo.evaluate import evaluate_zoo
    from cosine.zoo.paths import zoo_dir

    manifest = evaluate_zoo(zoo_path, threads=threads)
    spec = manifest["evaluation"]["acceptance_matrix"]["specialisation"]
    for domain, s in spec.items():
        click.echo(f"{domain:8s} best={s['best']:8s} own={s['own']} next={s['next_best']} margin={s['margin']:+.1%}")
    click.echo(f"model card: {zoo_dir(zoo_path) / 'MODEL_CARD.md'}")


# -- bench --------------------------------------------------------------------------------------------
@cli.group()
def bench() -> None:
    """Benchmarks. Compare only numbers from one run on the same machine."""


@bench.command("engine")
@click.option("--zoo", "zoo_path", type=click.Path(file_okay=False), default=None)
@click.option("--prompts-per-domain", type=int, default=8, show_default=True)
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--k", type=int, default=4, show_default=True, help="Draft positions per round.")
@click.option("--tree-width", type=int, default=2, show_default=True, help="Candidates per position in tree runs.")
@click.option("--batch", "batches", type=int, multiple=True, default=(1, 8), show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="auto", show_default=True, help="auto = float32 on CPU, bfloat16 on CUDA.")
@click.option("--hf/--no-hf", "hf", default=True, show_default=True, help="Include Hugging Face baselines.")
@click.option("--out", type=click.Path(file_okay=False), default="bench-results", show_default=True)
@click.option("--update-readme", is_flag=True, help="Write the table into README.md.")
def bench_engine(zoo_path, prompts_per_domain, max_new_tokens, k, tree_width, batches, threads, device, dtype, hf, out,
                 update_readme) -> None:
    """Target-only vs HF assisted generation vs the engine's coupled speculative path (chain, tree)."""
    from cosine.bench.engine_bench import EngineBenchConfig, engine_markdown, run_engine_bench
    from cosine.bench.report import update_readme as write_readme
    from cosine.bench.report import write_results

    cfg = EngineBenchConfig(zoo_path, prompts_per_domain, max_new_tokens, k, tree_width, tuple(batches), threads,
                            device, dtype, hf)
    payload = run_engine_bench(cfg)
    md = engine_markdown(payload)
    js, mdf = write_results(pathlib.Path(out), "engine", payload, md)
    click.echo(md)
    click.echo(f"\nwrote {js} and {mdf}")
    if update_readme and write_readme(REPO_ROOT / "README.md", "engine", md):
        click.echo("README.md updated")


# -- generation ---------------------------------------------------------------------------------------
@cli.command()
@click.option("--zoo", "zoo_path", type=click.Path(file_okay=False), default=None)
@click.option("--prompts-per-domain", type=int, default=2, show_default=True)
@click.option("--max-new-tokens", type=int, default=48, show_default=True)
@click.option("--k", type=int, default=4, show_default=True)
@click.option("--tree-width", type=int, default=2, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
def demo(zoo_path, prompts_per_domain, max_new_tokens, k, tree_width, threads) -> None:
    """Run the zoo on mixed-domain prompts: target alone, then speculative; print text, speed, acceptance."""
    import torch

    from cosine.engine.sequence import SpecStats
    from cosine.engine.speculative import SpecConfig, SpeculativeEngine
    from cosine.sampling_params import SamplingParams
    from cosine.zoo import paths

    torch.set_num_threads(threads)
    root = paths.zoo_dir(zoo_path)
    engine = SpeculativeEngine.from_zoo(root, config=SpecConfig(k=k, tree_width=tree_width))
    prompts = []
    for domain, texts in sorted(paths.load_prompts(root).items()):
        prompts += [(domain, t) for t in texts[:prompts_per_domain]]
    params = SamplingParams(max_new_tokens=max_new_tokens)
    texts = [t for _, t in prompts]
    engine.generate(texts[:1], SamplingParams(max_new_tokens=4))  # warm-up
    t0 = time.perf_counter()
    plain = engine.generate(texts, params, speculative=False)
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    spec = engine.generate(texts, params)
    t_spec = time.perf_counter() - t0
    total = SpecStats()
    for (domain, prompt), s, p in zip(prompts, spec, plain):
        total.merge(s.stats)
        click.secho(f"--- [{domain}] drafter={s.drafter} acceptance length {s.stats.mean_acceptance_length:.2f}",
                    fg="cyan")
        click.echo(prompt.rstrip("\n")[-200:], nl=False)
        click.secho(engine.text(s), fg="green")
        if s.output_ids != p.output_ids:
            click.secho("  (differs from the target alone)", fg="red")
    n_plain = sum(len(s.output_ids) for s in plain)
    n_spec = sum(len(s.output_ids) for s in spec)
    same = sum(s.output_ids == p.output_ids for s, p in zip(spec, plain))
    click.echo("")
    click.echo(f"target alone : {n_plain / t_plain:7.1f} tokens/s ({n_plain} tokens, {t_plain:.2f} s)")
    click.echo(f"speculative  : {n_spec / t_spec:7.1f} tokens/s ({n_spec} tokens, {t_spec:.2f} s), "
               f"{t_plain / t_spec:.2f}x")
    click.echo(f"acceptance   : mean length {total.mean_acceptance_length:.2f}, rate {total.acceptance_rate:.2f}")
    shares = {k2: v / max(1, sum(total.tokens_by_drafter.values())) for k2, v in total.tokens_by_drafter.items()}
    click.echo("drafter share: " + ", ".join(f"{k2} {v:.0%}" for k2, v in sorted(shares.items())))
    click.echo(f"identical to the target alone: {same}/{len(spec)}")


@cli.command()
@click.argument("prompt")
@click.option("--zoo", "zoo_path", type=click.Path(file_okay=False), default=None)
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--drafter", default="auto", show_default=True, help="Drafter name, 'auto', or 'none'.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def generate(prompt, zoo_path, max_new_tokens, temperature, top_p, top_k, seed, stop, drafter, as_json) -> None:
    """Generate from PROMPT with the local zoo engine."""
    from cosine.engine.speculative import SpeculativeEngine
    from cosine.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, stop=tuple(stop))
    engine = SpeculativeEngine.from_zoo(zoo_path)
    speculative = drafter != "none"
    t0 = time.perf_counter()
    [seq] = engine.generate([prompt], params, drafter=drafter if speculative else None, speculative=speculative)
    seconds = time.perf_counter() - t0
    text = engine.text(seq)
    if as_json:
        click.echo(json.dumps({
            "text": text,
            "token_ids": seq.output_ids,
            "finish_reason": seq.finish_reason.value if seq.finish_reason else None,
            "drafter": seq.drafter,
            "seconds": round(seconds, 4),
            "stats": seq.stats.as_dict(),
        }))
    else:
        click.echo(prompt + text)


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except CosineError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
