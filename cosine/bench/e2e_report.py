"""``cosine bench e2e``'s targets, markdown tables and plots (the run itself: :mod:`cosine.bench.e2e_bench`)."""

from __future__ import annotations

from cosine.bench.hf_baselines import NEAR_TIE_LOGIT_GAP, match_cell
from cosine.bench.repeats import cell_value, ratio, repeats_markdown
from cosine.bench.versus import breakdown_markdown, closed, hf_targets, targets_markdown, versus_markdown
from cosine.markdown import table


def e2e_targets(results: list[dict], repeats: list[dict], views: tuple[str, ...]) -> dict:
    """The issues' targets on this run's numbers: CoSine against the Hugging Face baselines per view
    (:func:`cosine.bench.versus.hf_targets`), then the pipeline against the project's own paths."""
    out = hf_targets(results, repeats, "pipeline", views)

    def get(system: str, c: int, key: str):
        return cell_value(results, system, closed(c), key)

    shares = [r["messaging_share_of_step"] for r in results if r["system"] == "pipeline"
              and r.get("messaging_share_of_step") is not None]
    if shares:
        out["messaging_overhead_max"] = {"value": max(shares), "target": 0.05, "met": max(shares) <= 0.05,
                                         "what": "messaging / verify forward time, worst concurrency"}
    p8, c8, t8 = (get(p, 8, "throughput_tok_s") for p in ("pipeline", "coupled", "target-only"))
    if ratio(p8, c8):
        out["pipeline_vs_coupled_c8"] = {"value": ratio(p8, c8), "target": 1.5, "met": p8 / c8 >= 1.5,
                                         "what": "throughput at c=8, pipeline / coupled engine (equal compute)"}
    if ratio(p8, t8):
        out["pipeline_vs_target_only_c8"] = {"value": ratio(p8, t8), "target": 2.0, "met": p8 / t8 >= 2.0,
                                             "what": "throughput at c=8, pipeline / target-only engine (equal "
                                                     "compute)"}
    busy = get("pipeline", 8, "verifier_busy")
    if busy is not None:
        out["verifier_busy_c8"] = {"value": busy, "target": 0.85, "met": busy >= 0.85,
                                   "what": "verifier forward time / wall time at c=8"}
    return out


def _where(r: dict) -> str:
    if r.get("view") and r.get("threads"):
        return f"{r['view']}: cores {r['cpus']}, {r['threads']} thread{'s' if r['threads'] > 1 else ''}"
    return r.get("cpus") or "—"


def e2e_markdown(payload: dict) -> str:
    env, cfg = payload["environment"], payload["config"]
    rows = [[r["system"], _where(r), r["concurrency"], f"{r['throughput_tok_s']:.0f}", r["ttft_p50_ms"],
             r["tpot_p50_ms"], r["tpot_p99_ms"], r["mean_acceptance_length"] or "—", match_cell(r.get("output_match"))]
            for r in payload["results"]]
    main = table(["system", "placement", "concurrency", "tokens/s", "TTFT p50 (ms)", "per-token p50 (ms)",
                  "per-token p99 (ms)", "mean acceptance length", "same output as the target alone"], rows)
    parts = [main]
    if payload.get("versus"):
        parts.append(versus_markdown(payload["versus"]))
    pipeline = [r for r in payload["results"] if r["system"] == "pipeline"]
    if pipeline:
        limit = payload.get("physical_limit")
        head = ("Verifier time per pipeline row (share of the run's wall time), and the physical limit: mean "
                "acceptance length x HF's decode rate "
                + (f"({limit['hf_decode_tok_s']} tokens/s, {limit['from']})" if limit else "(no HF generate row)"))
        parts.append(f"{head}\n\n{breakdown_markdown(pipeline)}")
    parts.append(targets_markdown(payload["targets"]))
    if payload.get("repeats"):
        parts.append(repeats_markdown(payload["repeats"], "on the same deployment, the baselines on their cores"))
    place = payload.get("placement") or {}
    where = ", ".join(f"{name} {cpus}" for name, cpus in place.items()) or "nothing pinned"
    parts.append(
        f"Closed loop, {cfg['max_new_tokens']} new tokens per request, greedy, held-out mixed-domain prompts; "
        f"end-of-text {cfg['eos']}. Pipeline: k={cfg['k']}, tree width {cfg['tree_width']}, controller "
        f"{'on' if cfg['controller'] else 'off'}; cores per process (read back from the OS): {where}. "
        f"Views: node-emulated = baselines pinned to the verifier's cores; equal compute = baselines on every "
        f"core the deployment uses (the engine's own loops too); one torch thread per core. Outputs compared with "
        f"the target alone's ({cfg['reference']}); a near-tie is a divergence where the target's two candidates "
        f"score within {NEAR_TIE_LOGIT_GAP} logits. {env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}, "
        f"transformers {env['transformers']}; git {env['git_sha']}, {env['time']}.")
    return "\n\n".join(parts)


def e2e_plots(payload: dict, out_png: str) -> None:
    """Throughput, per-token latency and time to first token against concurrency, one line per system
    (a baseline that serves one request at a time is a single point at c=1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    systems = list(dict.fromkeys(r["system"] for r in payload["results"]))
    for system in systems:
        rows = [r for r in payload["results"] if r["system"] == system]
        xs = [r["concurrency"] for r in rows]
        style = {"marker": "o", "linestyle": "-" if system == "pipeline" else "--" if "node" in system else ":"}
        for ax, key in zip(axes, ("throughput_tok_s", "tpot_p50_ms", "ttft_p50_ms")):
            ax.plot(xs, [r[key] for r in rows], label=system, **style)
    for ax, title in zip(axes, ["throughput (tokens/s)", "per-token latency p50 (ms)", "time to first token p50 (ms)"]):
        ax.set_title(title)
        ax.set_xlabel("concurrency")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"CoSine end-to-end ({payload['environment']['cpu']}, git {payload['environment']['git_sha']})")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
