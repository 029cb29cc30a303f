"""Model families as target and drafter: exact through the engine and through a live deployment, windows and
soft-capping included; what the engine cannot run is refused at load with the reason; drafters are checked
by tokenizer, not by ``vocab_size``."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoTokenizer

from cosine.bench.families import FAMILIES, WINDOW, build, check_family, hf_greedy, save_pair
from cosine.client import Client
from cosine.engine.families import FULL, SLIDING, attention_implementation, layout_of
from cosine.engine.models import load_model
from cosine.engine.speculative import SpecConfig, SpeculativeEngine
from cosine.errors import ModelLoadError
from cosine.local_redis import LocalRedis
from cosine.sampling_params import SamplingParams
from cosine.zoo import paths

from .helpers import tiny_llama
from .pipeline_helpers import deployment, heartbeat_until


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_exact_through_the_engine(family):
    r = check_family(family)
    assert r.refused is None, r.refused
    assert r.greedy + r.greedy_long + r.near_ties == r.prompts + r.prompts_long, r
    assert r.greedy_long + r.near_ties >= r.prompts_long, r  # past the sliding window too
    assert r.sampled == r.samples, r


def test_layouts_follow_the_config():
    mistral = build("mistral", 64, 0)
    assert layout_of(mistral).windows == {SLIDING: WINDOW}
    gemma2 = build("gemma2", 64, 0)
    assert attention_implementation(gemma2.config) == "eager"  # SDPA cannot soft-cap attention scores
    gemma2.config._attn_implementation = "eager"
    layout = layout_of(gemma2)
    assert layout.windows == {SLIDING: WINDOW, FULL: None} and layout.by_kind and layout.additive
    assert layout_of(build("llama", 64, 0)).windows == {FULL: None}
    qwen = layout_of(build("qwen2", 64, 0))
    assert set(qwen.windows) == {FULL, SLIDING} and qwen.by_kind


def test_what_the_engine_cannot_run_is_refused_with_the_reason():
    model = tiny_llama()
    model.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ModelLoadError, match="linear_attention"):
        layout_of(model, "odd")
    model = tiny_llama()
    model.config.attention_chunk_size = 8
    with pytest.raises(ModelLoadError, match="chunked attention"):
        layout_of(model, "odd")
    model = tiny_llama()
    model.config.is_encoder_decoder = True
    with pytest.raises(ModelLoadError, match="encoder-decoder"):
        layout_of(model, "odd")


@pytest.fixture(scope="module")
def zoo_tokenizer_dir(zoo_root):
    return paths.target_dir(zoo_root)


def test_padded_vocabularies_sharing_a_tokenizer_are_accepted(tmp_path, zoo_tokenizer_dir):
    """Qwen2.5-0.5B and -32B pad one tokenizer to different table sizes: compared by tokenizer, they fit."""
    target, drafter = save_pair("qwen2", tmp_path, zoo_tokenizer_dir, vocab=4096)
    engine = SpeculativeEngine.from_paths(target, {"d": drafter}, device="cpu", dtype="float32")
    assert engine.verifier.runner.vocab_size == 4096 + 64
    assert engine.drafters["d"].runner.model.config.vocab_size == 4096 + 128
    seqs = engine.generate([[5, 6, 7, 8]], SamplingParams(max_new_tokens=8, ignore_eos=True), drafter="d")
    assert len(seqs[0].output_ids) == 8 and seqs[0].stats.drafts > 0


def _other_tokenizer_drafter(tmp_path, zoo_tokenizer_dir):
    """A Llama drafter whose tokenizer has one token more than the zoo's: same vocab_size, other ids."""
    folder = tmp_path / "other"
    tiny_llama(vocab=4096).save_pretrained(str(folder))
    tok = AutoTokenizer.from_pretrained(str(zoo_tokenizer_dir))
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tok.save_pretrained(str(folder))
    return folder


def test_a_drafter_with_another_tokenizer_is_refused_naming_both(tmp_path, zoo_tokenizer_dir):
    other = _other_tokenizer_drafter(tmp_path, zoo_tokenizer_dir)
    with pytest.raises(ModelLoadError) as err:
        SpeculativeEngine.from_paths(zoo_tokenizer_dir, {"odd": other}, device="cpu", dtype="float32")
    msg = str(err.value)
    assert str(other) in msg and str(zoo_tokenizer_dir) in msg and "4097 tokens" in msg and "4096 tokens" in msg


@pytest.mark.slow
def test_a_verifier_refuses_a_drafter_worker_with_another_tokenizer(tmp_path, zoo_tokenizer_dir, zoo_engine):
    other = _other_tokenizer_drafter(tmp_path, zoo_tokenizer_dir)
    prompt = list(range(40, 60))
    with LocalRedis() as srv, deployment(srv.url, drafters=1, log_dir=str(tmp_path),
                                         drafter_args=["--model", f"odd={other}"]) as dep:
        with Client(srv.url) as c:
            out = c.generate(prompt, max_new_tokens=12, ignore_eos=True, timeout=120)
        info = heartbeat_until(srv.url, "verifier", "verifier-0", lambda i: int(i.get("drafters_refused", 0)) == 1)
        assert int(info.get("draft_jobs", 0)) == 0
        log = (tmp_path / "verifier-0.log").read_text()
        assert "refusing drafter worker drafter-0" in log and "4097 tokens" in log and "4096 tokens" in log
        assert all(p.poll() is None for p in dep.procs.values())
    ref = zoo_engine.generate([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True), speculative=False)
    assert out.token_ids == ref[0].output_ids


# Through a live deployment: one family per mechanism beyond the engine's matrix (hybrid windows and padded
# tables, one window for every layer, eager attention with soft-capping, learned positions); each costs two
# worker processes, so the rest of the matrix runs through the engine only.
PIPELINE_FAMILIES = ("qwen2", "mistral", "gemma2", "opt")


@pytest.mark.slow
@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
def test_family_is_exact_through_the_pipeline(family, tmp_path, zoo_tokenizer_dir):
    """A live deployment serving a family's target with a drafter of its family: greedy outputs equal HF
    generate's, inside and past the sliding window, and seeded samples equal speculation off."""
    target_dir, drafter_dir = save_pair(family, tmp_path / "models", zoo_tokenizer_dir, vocab=4096)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4096, (n,), generator=g).tolist() for n in (12, 3 * WINDOW)]
    sampled = [SamplingParams(max_new_tokens=16, temperature=0.9, seed=7 + i, ignore_eos=True) for i in range(2)]
    with LocalRedis() as srv, deployment(srv.url, drafters=1, log_dir=str(tmp_path),
                                         verifier_args=["--model", str(target_dir)],
                                         drafter_args=["--model", f"d={drafter_dir}"]) as dep:
        with Client(srv.url) as c:
            ids = [c.submit(p, max_new_tokens=16, ignore_eos=True) for p in prompts]
            ids += [c.submit(p, params=s) for p, s in zip(prompts, sampled)]
            outs = [c.result(rid, timeout=180).token_ids for rid in ids]
        assert all(p.poll() is None for p in dep.procs.values())
    target = load_model(target_dir, "cpu", "float32")
    for prompt, out in zip(prompts, outs[:2]):
        assert out == hf_greedy(target, prompt, 16), (family, len(prompt))
    engine = SpeculativeEngine(target, {}, eos_id=None, config=SpecConfig(k=4))
    refs = engine.generate(prompts, sampled, speculative=False)
    assert outs[2:] == [r.output_ids for r in refs], family
    shutil.rmtree(tmp_path / "models")
