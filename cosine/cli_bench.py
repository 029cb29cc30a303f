"""``cosine bench``: the benchmark commands (each writes JSON, markdown and plots; see docs/benchmarks.md)."""

from __future__ import annotations

import pathlib
import shutil

import click

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


@click.group(invoke_without_command=True)
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Benchmarks. Compare only numbers from one run on the same machine.

    Without a subcommand: the end-to-end benchmark (`cosine bench e2e`) with its defaults."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(bench_e2e)


def _report(name: str, payload: dict, md: str, out: str, update_readme: bool, plot=None, caption: str = "") -> None:
    """Write a benchmark's JSON and markdown (and plot), print the tables, optionally put them in docs/benchmarks.md."""
    from cosine.bench.report import update_readme as write_readme
    from cosine.bench.report import write_results

    js, mdf = write_results(pathlib.Path(out), name, payload, md)
    png = None
    if plot is not None:
        png = str(js).replace(".json", ".png")
        plot(payload, png)
    click.echo(md)
    click.echo(f"\nwrote {js}, {mdf}" + (f" and {png}" if png else ""))
    if not update_readme:
        return
    if png is not None:
        docs = REPO_ROOT / "docs"
        docs.mkdir(exist_ok=True)
        shutil.copy(png, docs / f"bench-{name}.png")
        md += f"\n\n![{caption or name}](bench-{name}.png)"
    if write_readme(REPO_ROOT / "docs" / "benchmarks.md", name, md):
        click.echo("docs/benchmarks.md updated")


# cosine.bench.e2e_bench.PATHS, spelled out so that `cosine --help` does not import torch
E2E_PATHS = ("pipeline", "hf-generate", "hf-batched", "hf-assisted", "target-only", "coupled")
_cpus_option = click.option(
    "--cpus", "cpus", multiple=True, metavar="ROLE=CPUS",
    help="Node-emulated placement: pin each worker to its own cores, e.g. --cpus verifier=0 --cpus drafter=1 "
         "(one torch thread per core; Redis, the controller and the client on the drafter's cores; baselines "
         "once on the verifier's cores and once on all of them). 'none': pin nothing, equal compute only. "
         "[default: verifier on the first core, drafter on the second]")


@bench.command("e2e")
@click.option("--zoo", "zoo_path", type=click.Path(file_okay=False), default=None)
@click.option("--concurrency", "concurrency", type=int, multiple=True, default=(1, 4, 8, 16), show_default=True)
@click.option("--requests-per-client", type=int, default=3, show_default=True)
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--k", type=int, default=4, show_default=True)
@click.option("--tree-width", type=int, default=1, show_default=True)
@click.option("--path", "paths_", type=click.Choice(list(E2E_PATHS)), multiple=True, default=E2E_PATHS,
              show_default=True)
@_cpus_option
@click.option("--repeats", type=click.IntRange(0), default=5, show_default=True,
              help="After the sweep, run CoSine and each baseline it has a target against this many times more, "
                   "alternated, against the machine's drift; the targets use these runs (0: the sweep's cells).")
@click.option("--controller/--no-controller", default=True, show_default=True,
              help="Run the controller beside the pipeline's workers.")
@click.option("--out", type=click.Path(file_okay=False), default="bench-results", show_default=True)
@click.option("--update-readme", is_flag=True, help="Write the table into docs/benchmarks.md.")
def bench_e2e(zoo_path=None, concurrency=(1, 4, 8, 16), requests_per_client=3, max_new_tokens=64, k=4,
              tree_width=1, paths_=E2E_PATHS, cpus=(), repeats=5, controller=True, out="bench-results",
              update_readme=False) -> None:
    """CoSine (verifier, drafter and controller processes over a private Redis) against Hugging Face
    `generate` (batch 1, batched, assisted) in the same run, node-emulated and with equal compute, beside
    the engine's own target-only and coupled loops; closed loop at each concurrency."""
    from cosine.bench.e2e_bench import E2EBenchConfig, run_e2e_bench
    from cosine.bench.e2e_report import e2e_markdown, e2e_plots

    cfg = E2EBenchConfig(zoo=zoo_path, concurrency=tuple(concurrency), requests_per_client=requests_per_client,
                         max_new_tokens=max_new_tokens, k=k, tree_width=tree_width, paths=tuple(paths_),
                         cpus=tuple(cpus), repeats=repeats, controller=controller)
    payload = run_e2e_bench(cfg)
    _report("e2e", payload, e2e_markdown(payload), out, update_readme, e2e_plots, "end-to-end benchmark")


_repeats_option = click.option(
    "--repeats", type=click.IntRange(0), default=None,
    help="After the sweep, run the c=8 and the fluctuating comparisons (in the ablation also CoSine against "
         "each baseline it has a target against) again this many times per system, alternated on fresh "
         "deployments, against the machine's drift; their targets use these runs (0: the sweep's cells).  "
         "[default: 5 for the ablation, 3 for the simulation]")


@bench.command("ablation")
@click.option("--zoo", "zoo_path", type=click.Path(file_okay=False), default=None)
@click.option("--system", "systems", multiple=True, default=None,
              help="Systems to run (repeatable) [default: cosine, each no-<mechanism>, plain-dsd, coupled, "
                   "target-only, hf-generate, hf-batched, hf-assisted].")
@click.option("--concurrency", type=int, multiple=True, default=(1, 4, 8, 16), show_default=True,
              help="Closed-loop concurrency levels.")
@_cpus_option
@click.option("--rates", type=(float, float), default=(1.0, 8.0), show_default=True,
              help="Low and high Poisson arrival rates (requests/s); the fluctuating run alternates them.")
@click.option("--requests-per-client", type=click.IntRange(1), default=6, show_default=True,
              help="Closed loop: requests each client sends (at least 6 per run in all).")
@click.option("--open-requests", type=int, default=24, show_default=True, help="Requests per open-loop run.")
@click.option("--fluctuating-requests", type=click.IntRange(1), default=144, show_default=True,
              help="Requests in the fluctuating open-loop run (about four low/high cycles).")
@click.option("--max-new-tokens", type=int, default=48, show_default=True)
@click.option("--k", type=int, default=4, show_default=True, help="k where speculation length is fixed.")
@_repeats_option
@click.option("--cost-model", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The verifiers' cost model, written by `cosine profile` [default: the built-in CPU numbers].")
@click.option("--out", type=click.Path(file_okay=False), default="bench-results", show_default=True)
@click.option("--update-readme", is_flag=True, help="Write the tables into docs/benchmarks.md.")
def bench_ablation(zoo_path, systems, concurrency, cpus, rates, requests_per_client, open_requests,
                   fluctuating_requests, max_new_tokens, k, repeats, cost_model, out, update_readme) -> None:
    """Full CoSine vs each mechanism switched off, plain distributed speculative decoding (one fixed
    drafter, fixed k), the coupled single-process path, target-only and Hugging Face `generate` (batch 1,
    batched, assisted), under closed-loop and Poisson load."""
    from cosine.bench.ablation import AblationConfig, run_ablation
    from cosine.bench.ablation_report import ablation_markdown, ablation_plots

    cfg = AblationConfig(zoo=zoo_path, concurrency=tuple(concurrency), rates=tuple(rates), cpus=tuple(cpus),
                         requests_per_client=requests_per_client, open_requests=open_requests,
                         fluctuating_requests=fluctuating_requests, max_new_tokens=max_new_tokens, k=k,
                         cost_model=cost_model, **({} if repeats is None else {"repeats": repeats}))
    if systems:
        cfg.systems = tuple(systems)
    payload = run_ablation(cfg)
    _report("ablation", payload, ablation_markdown(payload), out, update_readme, ablation_plots, "ablations")


@bench.command("cross-fusion")
@click.option("--zoo", "zoo_path", type=click.Path(file_okay=False), default=None)
@click.option("--system", "systems", multiple=True, default=None,
              help="Systems to run (repeatable) [default: one-process, cross-process, separate].")
@click.option("--concurrency", type=int, multiple=True, default=(1, 4, 8), show_default=True)
@click.option("--max-new-tokens", type=int, default=48, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="bench-results", show_default=True)
@click.option("--update-readme", is_flag=True, help="Write the table into docs/benchmarks.md.")
def bench_cross_fusion(zoo_path, systems, concurrency, max_new_tokens, out, update_readme) -> None:
    """Token fusion inside one drafter process (three experts) vs across three drafter processes (one expert
    each, a Redis round trip per draft position), and the three without fusion: speed, acceptance and the
    network cost."""
    from cosine.bench.cross_fusion_bench import CrossFusionConfig, cross_fusion_markdown, run_cross_fusion_bench

    cfg = CrossFusionConfig(zoo=zoo_path, concurrency=tuple(concurrency), max_new_tokens=max_new_tokens)
    if systems:
        cfg.systems = tuple(systems)
    payload = run_cross_fusion_bench(cfg)
    _report("cross-fusion", payload, cross_fusion_markdown(payload), out, update_readme)


@bench.command("sim")
@click.option("--verifiers", type=int, default=2, show_default=True)
@click.option("--drafters", type=int, default=16, show_default=True, help="Drafter workers.")
@click.option("--system", "systems", multiple=True, default=None,
              help="Systems to run (repeatable) [default: all, as in `cosine bench ablation`].")
@click.option("--concurrency", type=int, multiple=True, default=(1, 8, 32), show_default=True)
@click.option("--rates", type=(float, float), default=(4.0, 16.0), show_default=True,
              help="Low and high Poisson arrival rates (requests/s).")
@click.option("--requests", type=int, default=48, show_default=True, help="Requests per run.")
@click.option("--time-scale", type=float, default=1.0, show_default=True,
              help="Scale every simulated forward (timings mean something only at 1).")
@_repeats_option
@click.option("--out", type=click.Path(file_okay=False), default="bench-results", show_default=True)
@click.option("--update-readme", is_flag=True, help="Write the tables into docs/benchmarks.md.")
def bench_sim(verifiers, drafters, systems, concurrency, rates, requests, time_scale, repeats, out,
              update_readme) -> None:
    """The ablation table at cluster scale: real workers, Redis, controller and policies in one process,
    model forwards replaced by cost models (a 70B target on 4xA100, 68M drafters on consumer GPUs)."""
    from cosine.bench.sim_bench import SimBenchConfig, run_sim_bench, sim_markdown

    cfg = SimBenchConfig(verifiers=verifiers, drafters=drafters, concurrency=tuple(concurrency), rates=tuple(rates),
                         requests=requests, time_scale=time_scale, **({} if repeats is None else {"repeats": repeats}))
    if systems:
        cfg.systems = tuple(systems)
    payload = run_sim_bench(cfg)
    _report("sim", payload, sim_markdown(payload), out, update_readme)


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
@click.option("--repeats", type=int, default=1, show_default=True,
              help="Times every path runs over the prompts, interleaved chunk by chunk; medians are reported.")
@click.option("--micro-context", "micro_contexts", type=int, multiple=True, default=(64, 300), show_default=True,
              help="Contexts of the verify-pass micro-benchmark (against HF's one-token step).")
@click.option("--micro-calls", type=int, default=40, show_default=True,
              help="Interleaved calls per variant of the verify-pass micro-benchmark (0: skip it).")
@click.option("--out", type=click.Path(file_okay=False), default="bench-results", show_default=True)
@click.option("--update-readme", is_flag=True, help="Write the table into docs/benchmarks.md.")
def bench_engine(zoo_path, prompts_per_domain, max_new_tokens, k, tree_width, batches, threads, device, dtype, hf,
                 repeats, micro_contexts, micro_calls, out, update_readme) -> None:
    """HF generate (batch 1 and left-padded batches) and assisted generation vs the engine's target-only and
    coupled speculative paths (chain, tree), plus one verify pass against HF's one-token step."""
    from cosine.bench.engine_bench import EngineBenchConfig, engine_markdown, run_engine_bench

    cfg = EngineBenchConfig(zoo_path, prompts_per_domain, max_new_tokens, k, tree_width, tuple(batches), threads,
                            device, dtype, hf, repeats, tuple(micro_contexts), micro_calls)
    payload = run_engine_bench(cfg)
    _report("engine", payload, engine_markdown(payload), out, update_readme)


@bench.command("gpu")
@click.option("--device", default="cuda", show_default=True)
@click.option("--dtype", default="bfloat16", show_default=True)
@click.option("--layers", type=click.IntRange(1), default=None,
              help="Layers of the random-weight Llama-3-8B and Qwen2.5-7B shaped models.  [default: 4; 2 with --quick]")
@click.option("--quick", is_flag=True, help="Tiny shapes and few repeats: a smoke run that fits a CPU.")
@click.option("--out", type=click.Path(file_okay=False), default="gpu-check", show_default=True)
def bench_gpu(device, dtype, layers, quick, out) -> None:
    """A few minutes' check of the engine on one accelerator: the zoo's target and random-weight models shaped
    like Llama-3-8B and Qwen2.5-7B (a few layers, nothing downloaded); the engine's target-only greedy decoding
    against HF generate at batch 1 and 8, verify passes of 1, 5 and 9 tokens, host syncs per pass, the share
    of a pass outside the kernels, peak memory, and greedy exactness. Writes gpu-check.json and gpu-check.md."""
    from cosine.bench.gpu_check import gpu_markdown, run_gpu_check

    payload = run_gpu_check(device, dtype, out, quick=quick, layers=layers)
    click.echo(gpu_markdown(payload))
    click.echo(f"\nwrote {pathlib.Path(out) / 'gpu-check.json'} and {pathlib.Path(out) / 'gpu-check.md'}")


@bench.command("families")
@click.option("--family", "families", multiple=True, help="Only these families [default: all].")
@click.option("--out", type=click.Path(file_okay=False), default="bench-results", show_default=True)
@click.option("--update-readme", is_flag=True, help="Write the table into docs/benchmarks.md.")
def bench_families(families, out, update_readme) -> None:
    """The family matrix: random-weight tiny models of Llama, Qwen2, Mistral, Gemma-2/3, Phi-3, GPT-NeoX and
    OPT (built from configs, nothing downloaded), each with a drafter of its family, through the engine:
    greedy output against HF generate (inside and past the sliding window) and seeded sampling with
    speculation on against off."""
    from cosine.bench.families import FAMILIES, matrix_markdown, run_matrix

    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise click.BadParameter(f"unknown {unknown}; have {', '.join(FAMILIES)}", param_hint="--family")
    payload = run_matrix(tuple(families) or FAMILIES, progress=lambda f: click.echo(f"checking {f}", err=True))
    _report("families", payload, matrix_markdown(payload), out, update_readme)
