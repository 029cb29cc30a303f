"""``cosine bench ablation``'s markdown tables and plots (the run itself: :mod:`cosine.bench.ablation`)."""

from __future__ import annotations

from cosine.bench.repeats import cell_value as _get
from cosine.bench.repeats import repeats_markdown
from cosine.bench.versus import breakdown_cell, targets_markdown, versus_markdown
from cosine.markdown import table


def ablation_markdown(payload: dict, note: bool = True) -> str:
    env, cfg = payload["environment"], payload["config"]
    workloads = list(dict.fromkeys(r["workload"] for r in payload["results"]))
    systems = list(dict.fromkeys(r["system"] for r in payload["results"]))

    def cell(system, workload, key, fmt="{:.0f}"):
        v = _get(payload["results"], system, workload, key)
        return "—" if v is None else fmt.format(v)

    tp = table(["system", *workloads], [[s, *(cell(s, w, "throughput_tok_s") for w in workloads)] for s in systems])
    lat = table(["system", *workloads],
                [[s, *(f"{cell(s, w, 'tpot_p50_ms')} / {cell(s, w, 'tpot_p99_ms')}" for w in workloads)]
                 for s in systems])
    mal = table(["system", *workloads],
                [[s, *(cell(s, w, "mean_acceptance_length", "{:.2f}") for w in workloads)] for s in systems])
    tg = targets_markdown(payload["targets"])
    tables = (f"Throughput (tokens/s)\n\n{tp}\n\nPer-token latency p50 / p99 (ms)\n\n{lat}\n\n"
              f"Mean acceptance length\n\n{mal}")
    passes = [s for s in systems if any(r.get("verifier_pass") for r in payload["results"] if r["system"] == s)]
    if passes:
        cells = {(r["system"], r["workload"]): breakdown_cell(r) for r in payload["results"]}
        tables += ("\n\nVerifier time: forward / blocked on drafts / messaging / overhead (% of the run's wall time)"
                   "\n\n" + table(["system", *workloads], [[s, *(cells.get((s, w), "—") for w in workloads)]
                                                           for s in passes]))
    limit = payload.get("physical_limit")
    at_c1 = [(r["system"], r["limit"]) for r in payload["results"] if r["workload"] == "closed c=1" and r.get("limit")]
    if limit and at_c1:
        tables += (f"\n\nPhysical limit at c=1 (mean acceptance length x HF's decode rate, {limit['hf_decode_tok_s']} "
                   f"tokens/s on {limit['from']}), and each system's per-request rate against it: "
                   + "; ".join(f"{s} {lim['per_request_tok_s']:.0f} of {lim['tok_s']:.0f} tokens/s "
                               f"({lim['of_limit']:.0%})" for s, lim in at_c1) + ".")
    if payload.get("versus"):
        tables += "\n\n" + versus_markdown(payload["versus"])
    tables += "\n\n" + tg
    if payload.get("repeats"):
        tables += "\n\n" + repeats_markdown(payload["repeats"])
    if not note:
        return f"{tables}\n\ngit {env['git_sha']}, {env['time']}."
    text = (f"{cfg['max_new_tokens']} new tokens per request (greedy, end-of-text ignored), mixed-domain held-out "
            f"prompts; closed loop: {cfg['requests_per_client']} requests per client (at least "
            f"{cfg['min_requests']} per run); k={cfg['k']} where fixed; Poisson rates {cfg['rates'][0]} and "
            f"{cfg['rates'][1]} requests/s "
            f"(fluctuating: switching every {cfg['fluctuate_s']} s), {cfg['open_requests']} requests per open-loop "
            f"run ({cfg.get('fluctuating_requests', cfg['open_requests'])} in the fluctuating one); "
            f"plain DSD drafts with `{cfg['plain_drafter']}` only; {_placement(payload)}; "
            f"{env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}; git {env['git_sha']}, {env['time']}.")
    return f"{tables}\n\n{text}"


def _placement(payload: dict) -> str:
    """Where the processes ran, and the views the baselines were measured in."""
    place = payload.get("placement") or {}
    if not place:
        return "nothing pinned (every process on every core; baselines and the engine's loops on all of them)"
    return ("cores per process (read back from the OS, the same for every system's deployment): "
            + ", ".join(f"{name} {cpus}" for name, cpus in place.items())
            + "; one torch thread per core; baselines node-emulated (on the verifier's cores) and with equal "
              "compute (on every core the deployment uses), the engine's loops with equal compute")


def ablation_plots(payload: dict, out_png: str) -> None:
    """Throughput and per-token latency p99 per system for every workload (grouped bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = payload["results"]
    workloads = list(dict.fromkeys(r["workload"] for r in results))
    systems = list(dict.fromkeys(r["system"] for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(16, 4.8))
    width = 0.8 / max(1, len(systems))
    colours = plt.get_cmap("tab20").colors  # more systems than the default cycle's 10 colours
    for i, system in enumerate(systems):
        xs = [j + i * width for j in range(len(workloads))]
        for ax, key in zip(axes, ("throughput_tok_s", "tpot_p99_ms")):
            ax.bar(xs, [_get(results, system, w, key) or 0 for w in workloads], width, label=system,
                   color=colours[(2 * i) % 20 + (2 * i) // 20])
    for ax, title in zip(axes, ("throughput (tokens/s)", "per-token latency p99 (ms)")):
        ax.set_title(title)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(workloads))], workloads, rotation=20, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    env = payload["environment"]
    fig.suptitle(f"CoSine ablations ({env['cpu']}, git {env['git_sha']})")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
