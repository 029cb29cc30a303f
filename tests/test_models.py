"""Any Hugging Face causal LM sharing the target's tokenizer works as the target; a drafter with another
vocabulary is refused, naming both."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from cosine.engine.models import load_model
from cosine.engine.speculative import SpecConfig, SpeculativeEngine
from cosine.errors import InvalidParameterError, ModelLoadError
from cosine.sampling_params import SamplingParams
from cosine.zoo import paths

from .helpers import greedy_divergences, tiny_llama


def _save_with_zoo_tokenizer(model, folder, zoo_root):
    model.save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(paths.target_dir(zoo_root) / name, folder / name)


def test_drafter_with_other_vocabulary_is_refused(tmp_path, zoo_root):
    other = tmp_path / "other-drafter"
    tiny_llama(vocab=1000).save_pretrained(str(other))
    with pytest.raises(ModelLoadError) as err:
        SpeculativeEngine.from_paths(paths.target_dir(zoo_root), {"odd": other})
    msg = str(err.value)
    assert "1000 ids" in msg and "4096 ids" in msg and str(other) in msg


def test_unknown_model_path_is_a_typed_error(tmp_path):
    with pytest.raises(ModelLoadError):
        load_model(tmp_path / "nothing-here")
    with pytest.raises(InvalidParameterError) as err:
        load_model(tmp_path, dtype="float8")
    assert err.value.field == "dtype"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_other_architectures_as_target(tmp_path, zoo_root, zoo_prompts, arch):
    vocab = paths.load_manifest(zoo_root)["tokenizer"]["vocab_size"]
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                           initializer_range=0.3, bos_token_id=0, eos_token_id=0))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=512, initializer_range=0.3,
                                             bos_token_id=0, eos_token_id=0))
    folder = tmp_path / arch
    _save_with_zoo_tokenizer(model, folder, zoo_root)
    engine = SpeculativeEngine.from_paths(
        folder, {"code": paths.drafter_dir("code", zoo_root)}, device="cpu", dtype="float32",
        config=SpecConfig(k=3, tree_width=2),
    )
    ids = [engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in zoo_prompts["code"][:6]]
    ids = [p[-200:] for p in ids]
    seqs = engine.generate(ids, SamplingParams(max_new_tokens=16), drafter="code")
    target = engine.verifier.runner.model
    refs = [target.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False)[0, len(p):].tolist() for p in ids]
    ties, failures = greedy_divergences(target, ids, [s.output_ids for s in seqs], refs)
    assert not failures, failures
    assert sum(s.stats.drafts for s in seqs) > 0
