"""The verify-pass micro-benchmark of `cosine bench engine`: every pass shape against HF's one-token step."""

from __future__ import annotations

from cosine.bench.engine_bench import _targets, engine_markdown, verify_micro


def test_verify_micro_times_every_pass_against_the_hf_step(zoo_engine):
    rows = verify_micro(zoo_engine, (16,), calls=2)
    assert [r["pass"] for r in rows] == ["HF one-token step", "HF forward of 5 tokens", "HF forward of 9 tokens",
                                         "plain step (Q=1)", "chain Q=5", "chain Q=9", "tree Q=9 (k=4 w=2)"]
    assert rows[0]["vs_hf_step"] == 1.0 and all(r["ms"] > 0 and r["vs_hf_step_cpu_time"] > 0 for r in rows)
    # the engine's rows are rolled back after each call: the engine's own runner is untouched
    assert zoo_engine.verifier.runner.kv.rows == 0
    targets = _targets([], rows)
    assert set(targets) == {"verify_pass_vs_hf_step_max"}
    assert targets["verify_pass_vs_hf_step_max"]["wall"] == max(r["vs_hf_step"] for r in rows[3:])
    payload = {"environment": {"cpu": "x", "cpu_count": 2, "torch": "t", "git_sha": "g", "time": "now"},
               "config": {"prompts": 0, "max_new_tokens": 1, "repeats": 1, "batch_sizes": [1], "threads": 1,
                          "device": "cpu", "dtype": "auto", "micro_calls": 2},
               "results": [], "verify_pass": rows, "targets": targets}
    md = engine_markdown(payload)
    assert "× HF one-token step" in md and "verify_pass_vs_hf_step_max" in md
