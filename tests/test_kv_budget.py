"""KV memory: bytes per token slot against what the cache really allocates, bounded growth, a budget the
buffers stay within, and admission arithmetic (what fits now, what could ever fit)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import GPT2Config, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, OPTConfig

from cosine.engine.kv_budget import SLOT_CHUNK, bytes_per_token, capacity_tokens, dtype_bytes, grow, kv_shape, plan
from cosine.engine.runner import ModelRunner
from cosine.engine.sequence import Sequence
from cosine.engine.target import TargetVerifier
from cosine.engine.tree import DraftTree
from cosine.errors import InvalidParameterError
from cosine.sampling_params import SamplingParams
from cosine.units import human_bytes, parse_bytes

from .helpers import tiny_llama


def storage_bytes(runner: ModelRunner) -> int:
    """Bytes the cache's tensors really hold (their storages), counted apart from the cache's own sum."""
    return sum(t.untyped_storage().nbytes() for layer in runner.kv._layers() for t in (layer.kbuf, layer.vbuf))


def fill(runner: ModelRunner, prompts: list[list[int]]) -> None:
    runner.add_rows([f"r{i}" for i in range(len(prompts))], prompts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_per_token_is_what_a_tiny_llama_allocates(dtype):
    model = tiny_llama().to(dtype)  # 2 layers, 2 key/value heads of 32 / 4 = 8 dims
    per_slot = bytes_per_token(model.config, dtype)
    assert per_slot == 2 * 2 * 8 * 2 * dtype.itemsize
    runner = ModelRunner(model)
    fill(runner, [[1, 2, 3], list(range(5, 75)), [7] * 20])
    rows, slots = runner.kv.capacity
    assert rows >= 3 and slots >= 70
    assert storage_bytes(runner) == runner.kv.allocated_bytes == rows * slots * per_slot
    assert runner.kv.peak_bytes >= runner.kv.allocated_bytes


def test_bytes_per_token_of_a_gpt_neox_model_matches_its_cache():
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, num_hidden_layers=3,
                        intermediate_size=64, max_position_embeddings=128)
    runner = ModelRunner(GPTNeoXForCausalLM(cfg).eval())
    fill(runner, [[1, 2, 3, 4], [5, 6]])
    rows, slots = runner.kv.capacity
    assert storage_bytes(runner) == rows * slots * bytes_per_token(cfg, torch.float32) == rows * slots * 3 * 4 * 8 * 8


def test_kv_shape_across_config_styles():
    assert kv_shape(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                num_hidden_layers=3)) == (3, 2, 16)
    assert kv_shape(LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=32, num_hidden_layers=3)) == (3, 4, 32)
    assert kv_shape(GPTNeoXConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=5)) == (5, 4, 16)
    assert kv_shape(OPTConfig(hidden_size=64, num_attention_heads=8, num_hidden_layers=2)) == (2, 8, 8)
    assert kv_shape(GPT2Config(n_embd=64, n_head=4, n_layer=6)) == (6, 4, 16)
    assert kv_shape({"n_layer": 2, "n_head": 8, "n_embd": 64, "multi_query": True}) == (2, 1, 8)
    assert bytes_per_token({"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                            "hidden_size": 4096}, "bfloat16") == 128 * 1024  # Llama-3-8B: 128 KiB a token
    assert capacity_tokens(None, {}, 2) is None
    assert capacity_tokens(2**30, {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                   "hidden_size": 4096}, torch.bfloat16) == 8192
    assert (dtype_bytes("torch.float16"), dtype_bytes(torch.float32), dtype_bytes(1)) == (2, 4, 1)
    with pytest.raises(ValueError):
        kv_shape({"hidden_size": 64})


def test_growth_is_bounded_not_doubling():
    have, reallocations = 0, 0
    for need in range(1, 5000):
        new = grow(need, have)
        if new != have:
            reallocations += 1
            assert new % SLOT_CHUNK == 0 and need <= new <= max(need + SLOT_CHUNK, 1.25 * have + 2 * SLOT_CHUNK)
            have = new
        assert have < 1.25 * need + 2 * SLOT_CHUNK  # never several times what is in use
    assert reallocations < 20
    assert plan(33, 10, 32, 64) == (40, 64)  # a row more: a quarter more rows, not twice as many


def test_a_limit_is_never_exceeded_when_the_need_fits():
    rng = random.Random(0)
    for _ in range(2000):
        limit = rng.randrange(64, 20000)
        need_rows = rng.randrange(1, 40)
        need_slots = rng.randrange(1, max(2, limit // need_rows + 1))
        have_rows, have_slots = rng.randrange(0, need_rows + 3), rng.randrange(0, 4 * SLOT_CHUNK)
        rows, slots = plan(need_rows, need_slots, have_rows, have_slots, limit)
        assert rows >= need_rows and slots >= need_slots
        if need_rows * need_slots <= limit:
            assert rows * slots <= limit
    assert plan(2, 100, 1, 64, limit=150) == (2, 100)  # past the limit: exactly the need, nothing spare


def run(verifier: TargetVerifier, seqs: list[Sequence], rng: random.Random, k: int = 6) -> None:
    """Admit ``seqs`` as they fit, step every admitted one with a random chain of ``k`` drafts (some true
    tokens are accepted, most rejected), release those that finish, until all are done."""
    waiting = list(seqs)
    while waiting or verifier.seqs:
        while waiting and verifier.fits(waiting[0]).now:
            verifier.admit([waiting.pop(0)])
        assert verifier.seqs, "a sequence that fits alone must be admitted into an empty cache"
        verifier.step({sid: DraftTree.chain([rng.randrange(53) for _ in range(k)]) for sid in verifier.seqs})
        if verifier.capacity_tokens is not None:
            rows, slots = verifier.runner.kv.capacity
            assert rows * slots <= verifier.capacity_tokens
        verifier.release([sid for sid, s in verifier.seqs.items() if s.finished])


def test_a_budgeted_target_stays_within_it_and_decodes_the_same():
    model = tiny_llama(vocab=53, seed=3)
    rng = random.Random(1)
    prompts = [[rng.randrange(53) for _ in range(n)] for n in (3, 9, 30, 5, 14, 2)]
    outputs = []
    for capacity in (None, 150):
        verifier = TargetVerifier(ModelRunner(model), eos_id=None, capacity_tokens=capacity)
        seqs = [Sequence(list(p), SamplingParams(max_new_tokens=20), seq_id=f"s{i}") for i, p in enumerate(prompts)]
        run(verifier, seqs, random.Random(2))
        outputs.append([s.output_ids for s in seqs])
        kv = verifier.runner.kv
        if capacity is not None:
            assert verifier.trees_cut > 0, "the scenario must cut drafts at the budget's edge"
            assert kv.peak_bytes <= capacity * verifier.slot_bytes
        assert kv.allocated_bytes == 0 and kv.peak_bytes > 0  # the last row gone: the buffers are freed
    assert outputs[0] == outputs[1]


def test_buffers_shrink_when_rows_leave():
    runner = ModelRunner(tiny_llama())
    fill(runner, [list(range(1, 100))] + [[1, 2]] * 7)
    before = runner.kv.allocated_bytes
    runner.remove_rows([f"r{i}" for i in range(1, 8)])
    assert runner.kv.allocated_bytes <= before / 4
    assert runner.kv.capacity[1] >= 99


def test_fits_now_and_ever():
    verifier = TargetVerifier(ModelRunner(tiny_llama()), eos_id=None, capacity_tokens=100)  # context: 128

    def seq(prompt: int, new: int) -> Sequence:
        return Sequence([1] * prompt, SamplingParams(max_new_tokens=new))

    a = seq(10, 30)
    assert verifier.fits(a).now and verifier.fits(a).need == 40
    verifier.admit([a])
    assert verifier.fits(seq(5, 35)).now  # 2 rows x 40
    assert not verifier.fits(seq(5, 35), [seq(5, 35)]).now  # 3 rows x 40
    late = verifier.fits(seq(20, 40))  # 2 rows x 60 > 100, but alone it fits
    assert not late.now and late.ever and late.capacity == 100
    assert not verifier.fits(seq(10, 500)).ever and verifier.fits(seq(10, 500)).need == 128  # capped by the context
    assert TargetVerifier(ModelRunner(tiny_llama()), eos_id=None).fits(seq(10, 500)).ever  # no budget


def test_sizes_parse_and_print():
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("1.5 gib") == 3 * 2**29
    assert parse_bytes("4096") == parse_bytes(4096) == 4096
    for bad in ("", "12 parsecs", "-1", "0", "MiB", True):
        with pytest.raises(InvalidParameterError):
            parse_bytes(bad)
    assert (human_bytes(512 * 2**20), human_bytes(1536), human_bytes(10), human_bytes(None)) == (
        "512 MiB", "1.50 KiB", "10 B", "")
