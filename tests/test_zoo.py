"""The committed demo zoo: loadable offline, within its size budget, specialised as the model card says."""

from __future__ import annotations

import pathlib

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from cosine.zoo import corpora, paths

SIZE_BUDGET_MB = 50


def test_zoo_within_size_budget(zoo_root):
    total = sum(f.stat().st_size for f in pathlib.Path(zoo_root).rglob("*") if f.is_file())
    assert total / 1e6 <= SIZE_BUDGET_MB, f"zoo is {total / 1e6:.1f} MB"


def test_models_load_with_auto_classes(zoo_root):
    manifest = paths.load_manifest(zoo_root)
    tok = AutoTokenizer.from_pretrained(str(paths.target_dir(zoo_root)))
    text = "def add(a, b):\n    return a + b\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    target = AutoModelForCausalLM.from_pretrained(str(paths.target_dir(zoo_root)))
    assert 10e6 <= sum(p.numel() for p in target.parameters()) <= 20e6
    assert len(manifest["drafters"]) >= 3
    for name in manifest["drafters"]:
        drafter = AutoModelForCausalLM.from_pretrained(str(paths.drafter_dir(name, zoo_root)))
        assert 0.8e6 <= sum(p.numel() for p in drafter.parameters()) <= 3e6
        assert drafter.config.vocab_size == target.config.vocab_size


def test_manifest_records_provenance(zoo_root):
    m = paths.load_manifest(zoo_root)
    for d, c in m["corpora"].items():
        assert len(c["train_sha256"]) == 64 and c["test_tokens"] > 1000
    assert m["target"]["train"]["loss_curve"] and all(v["train"]["loss_curve"] for v in m["drafters"].values())
    assert "evaluation" in m, "run `cosine zoo evaluate`"


def test_each_drafter_is_best_on_its_own_domain(zoo_root):
    ev = paths.load_manifest(zoo_root)["evaluation"]
    spec = ev["acceptance_matrix"]["specialisation"]
    for domain, s in spec.items():
        assert s["best"] == domain, f"{domain}: {s}"
        assert s["margin"] >= 0.15, f"{domain}: own drafter only {s['margin']:+.1%} above the next"


def test_document_split_is_deterministic():
    names = [f"doc:{i}" for i in range(2000)]
    picks = [corpora._is_test(n) for n in names]
    assert picks == [corpora._is_test(n) for n in names]
    assert 0.03 < sum(picks) / len(picks) < 0.09


def test_records_corpus_is_deterministic():
    a = corpora.records_corpus(200_000)
    b = corpora.records_corpus(200_000)
    assert a.sha256("train") == b.sha256("train") and a.sha256("test") == b.sha256("test")
    assert a.chars("train") >= 200_000 and a.test


@pytest.mark.parametrize("domain", corpora.DOMAINS)
def test_heldout_text_and_prompts_exist(zoo_root, domain):
    assert len(paths.heldout_text(domain, zoo_root)) > 10_000
    assert len(paths.load_prompts(zoo_root)[domain]) >= 18
