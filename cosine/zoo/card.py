"""Render the zoo's model card (``MODEL_CARD.md``) from its manifest."""

from __future__ import annotations

import pathlib

from cosine.markdown import table as _table

STEP_RATIO_GOAL = 0.2  # a drafter step should cost at most this share of a target step


def _ratio_goal(ev: dict) -> str:
    worst1 = max(ev["drafter_to_target_step_ratio"].values())
    worst8 = max(ev.get("drafter_to_target_step_ratio_batch8", {}).values(), default=float("nan"))
    verdict = "met" if worst1 <= STEP_RATIO_GOAL else "missed"
    return (f"Goal: at most {STEP_RATIO_GOAL} of a target step — {verdict} at batch 1 (worst drafter "
            f"{worst1:.3f}); at batch 8 the worst is {worst8:.3f}.")


def render(manifest: dict) -> str:
    s = manifest["settings"]
    ev = manifest.get("evaluation", {})
    domains = sorted(manifest["corpora"])
    models = {"target": manifest["target"], **manifest["drafters"]}
    out = [
        "# CoSine demo zoo — model card",
        "",
        "Small Llama-style models trained from scratch on text that ships with every CPython installation, so the",
        "whole system (tests, demo, benchmarks) runs offline on two CPU cores. They are demonstration models: the",
        "target is what speculative decoding must reproduce exactly, the drafters are cheap domain experts for it.",
        "",
        f"Built {manifest['built_at']} with Python {manifest['python']}, torch {manifest['torch']}, transformers "
        f"{manifest['transformers']} in {manifest['build_seconds'] / 60:.1f} min; rebuild with `cosine zoo build` "
        "(then `cosine zoo evaluate` refreshes the measurements below).",
        "",
        "## Models",
        "",
        _table(
            ["model", "role", "parameters", "layers × hidden (heads, MLP)", "training tokens", "training time",
             "distilled share"],
            [
                [
                    name,
                    "target" if name == "target" else f"drafter ({m['domain']})",
                    f"{m['parameters'] / 1e6:.2f} M",
                    f"{m['spec']['layers']} × {m['spec']['hidden']} ({m['spec']['heads']}, {m['spec']['intermediate']})",
                    f"{m['train']['trained_tokens'] / 1e6:.2f} M",
                    f"{m['train']['seconds'] / 60:.1f} min",
                    "—" if name == "target" else f"{s['drafter_distill_fraction']:.0%} of steps (KL to target)",
                ]
                for name, m in models.items()
            ],
        ),
        "",
        f"Tokenizer: byte-level BPE, {manifest['tokenizer']['vocab_size']} tokens (`tokenizers`), shared by every "
        "model; id 0 `<|endoftext|>`, id 1 `<|pad|>`. Weights are fp16 safetensors; load with "
        "`AutoModelForCausalLM.from_pretrained(folder)`.",
        "",
        "## Corpora",
        "",
        "Each domain's documents are split into train and held-out test by a hash of the document name.",
        "",
        _table(
            ["domain", "source", "train tokens", "test tokens", "train sha256 (first 16)"],
            [
                [
                    d,
                    {
                        "code": "standard library `.py` sources, docstrings stripped, tests excluded",
                        "prose": "`pydoc_data.topics` and standard-library docstrings",
                        "records": "JSON/CSV/key=value records from unicodedata, http, errno, html.entities, "
                        "mimetypes, encodings, locale, calendar",
                    }.get(d, d),
                    manifest["corpora"][d]["train_tokens"],
                    manifest["corpora"][d]["test_tokens"],
                    manifest["corpora"][d]["train_sha256"][:16],
                ]
                for d in domains
            ],
        ),
    ]
    if ev:
        ppl = ev["heldout_perplexity"]
        out += [
            "",
            "## Held-out perplexity",
            "",
            _table(["model"] + domains, [[n] + [ppl[n][d] for d in domains] for n in ppl]),
            "",
            f"## CPU step times ({ev['torch_threads']} thread, one-token decode step at context 128, median)",
            "",
            _table(
                ["model", "batch 1 (ms)", "batch 8 (ms)", "÷ target step, batch 1", "÷ target step, batch 8"],
                [
                    [
                        n,
                        ev["step_ms"][n]["batch1"],
                        ev["step_ms"][n]["batch8"],
                        "1" if n == "target" else ev["drafter_to_target_step_ratio"][n],
                        "1" if n == "target" else ev.get("drafter_to_target_step_ratio_batch8", {}).get(n, "—"),
                    ]
                    for n in ev["step_ms"]
                ],
            ),
            "",
            "Times go through the engine's runner (the path drafting and verification take), with one torch "
            "thread. At these sizes a step is dominated by per-operation overhead (Python, kernel dispatch) "
            "rather than arithmetic, so a 2-layer drafter costs far more than its 1/12 share of the parameters. "
            + _ratio_goal(ev),
        ]
        am = ev["acceptance_matrix"]
        mat = am["mean_acceptance_length"]
        spec = am["specialisation"]
        out += [
            "",
            f"## Acceptance-length matrix (greedy, k = {am['k']}, {am['prompts_per_domain']} held-out prompts per "
            f"domain, {am['new_tokens']} new tokens each)",
            "",
            "Mean acceptance length = 1 + accepted / drafts (counts the bonus token); rows are drafters, columns "
            "the domain of the prompts. Bold: best on that domain.",
            "",
            _table(
                ["drafter"] + domains,
                [
                    [n] + [f"**{mat[n][d]}**" if spec[d]["best"] == n else mat[n][d] for d in domains]
                    for n in sorted(mat)
                ],
            ),
            "",
            _table(
                ["domain", "own drafter", "next best", "margin", "own drafter best by ≥ 15%"],
                [
                    [d, spec[d]["own"], spec[d]["next_best"], f"{spec[d]['margin']:+.1%}",
                     "yes" if spec[d]["meets_target"] else "**no**"]
                    for d in domains
                ],
            ),
        ]
    out += ["", "Loss curves, settings and every number above are in `manifest.json`.", ""]
    return "\n".join(out)


def write_model_card(root: pathlib.Path, manifest: dict) -> None:
    (root / "MODEL_CARD.md").write_text(render(manifest), encoding="utf-8")
