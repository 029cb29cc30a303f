"""Loading options and placement plans: device-map and max-memory parsing, quantisation refused with what is
missing, drafter devices per model, a Llama-3-70B-shaped model planned over four 40 GiB GPUs on meta tensors,
and models loaded through a device map decoding exactly as plainly loaded ones."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaConfig

from cosine.cli import cli
from cosine.cli_models import parse_model_entry
from cosine.engine import lean_llama, runner
from cosine.engine.models import load_model, memory_by_device, quantization_config
from cosine.engine.placement_plan import parse_device_map, parse_max_memory, plan_placement
from cosine.engine.speculative import SpecConfig, SpeculativeEngine
from cosine.errors import InvalidParameterError, ModelLoadError
from cosine.sampling_params import SamplingParams

from .helpers import tiny_llama

GiB = 1024**3
FOUR_GPUS = "0=40GiB,1=40GiB,2=40GiB,3=40GiB,cpu=64GiB"


def llama3_70b() -> LlamaConfig:
    return LlamaConfig(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       intermediate_size=28672, vocab_size=128256, max_position_embeddings=8192)


# -- parsing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["auto", "balanced", "balanced_low_0", "sequential"])
def test_device_map_strategies_pass_through(spec):
    assert parse_device_map(spec) == spec
    assert parse_device_map(None) is None and parse_device_map("") is None


def test_device_map_from_json_text_and_file(tmp_path):
    text = '{"model.embed_tokens": 0, "model.layers": "cuda:1", "model.norm": "1", "lm_head": "cpu"}'
    want = {"model.embed_tokens": 0, "model.layers": "cuda:1", "model.norm": 1, "lm_head": "cpu"}
    assert parse_device_map(text) == want
    path = tmp_path / "map.json"
    path.write_text(text)
    assert parse_device_map(str(path)) == want
    assert parse_device_map({"": "cpu"}) == {"": "cpu"}


@pytest.mark.parametrize("spec", ["everywhere", "{not json", '{"model": "gpu7"}', '{"model": "disk"}',
                                  '{"model": -1}', "{}", '["cpu"]', "/no/such/map.json", ["cpu"]])
def test_invalid_device_map_names_the_field(spec):
    with pytest.raises(InvalidParameterError) as err:
        parse_device_map(spec)
    assert err.value.field == "device_map"


def test_max_memory_parsing():
    assert parse_max_memory("0=70GiB,1=70GiB,cpu=100GiB") == {0: 70 * GiB, 1: 70 * GiB, "cpu": 100 * GiB}
    assert parse_max_memory(" cuda:1 = 40GB , cpu=1024 ") == {1: 40 * 10**9, "cpu": 1024}
    assert parse_max_memory({"0": "1.5GiB"}) == {0: int(1.5 * GiB)}
    assert parse_max_memory(None) is None


@pytest.mark.parametrize("spec", ["0=lots", "gpu=1GiB", "0=1GiB,0=2GiB", "70GiB", "0=0", "0=-5GB", ","])
def test_invalid_max_memory_names_the_field(spec):
    with pytest.raises(InvalidParameterError) as err:
        parse_max_memory(spec)
    assert err.value.field == "max_memory"


def _bitsandbytes_usable() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(_bitsandbytes_usable(), reason="bitsandbytes and a CUDA device are both here")
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantization_without_bitsandbytes_or_cuda_says_what_is_missing(tmp_path, bits):
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path, quantization=bits)
    msg = str(err.value)
    assert f"--quantization {bits}" in msg and "bitsandbytes" in msg
    if not torch.cuda.is_available():
        assert "no CUDA device" in msg


def test_unknown_quantization_names_the_field():
    with pytest.raises(InvalidParameterError) as err:
        quantization_config("3bit", torch.float16)
    assert err.value.field == "quantization"
    assert quantization_config("none", torch.float16) is None


def test_drafter_model_entries_take_an_optional_device():
    assert parse_model_entry("code=/m/code@cuda:1") == ("code", "/m/code", "cuda:1")
    assert parse_model_entry("code=/m/code") == ("code", "/m/code", None)
    assert parse_model_entry("code=/m/x@v2/model") == ("code", "/m/x@v2/model", None)  # an @ inside the path
    assert parse_model_entry("math=rel/math@cpu") == ("math", "rel/math", "cpu")
    for bad in ("code=/m/code@gpu7", "no-path", "=/m/code", "code="):
        with pytest.raises(InvalidParameterError) as err:
            parse_model_entry(bad)
        assert err.value.field == "model"


def test_drafter_worker_refuses_an_invalid_device_before_starting():
    result = CliRunner().invoke(cli, ["worker", "drafter", "--model", "code=/m/code@gpu7"])
    assert result.exit_code == 2, result.output
    assert "gpu7" in result.output and "--model" in result.output


# -- the plan on meta tensors ----------------------------------------------------------------------------


@pytest.mark.slow
def test_llama3_70b_is_planned_over_four_40gib_gpus():
    plan = plan_placement(llama3_70b(), "auto", FOUR_GPUS, "bf16")
    assert plan.dtype == torch.bfloat16
    # Every layer placed once, in order, contiguous per device, on GPUs only (it fits: ~131 GiB of 160).
    placed = [i for dev in plan.devices for i in plan.layers.get(dev, [])]
    assert placed == list(range(80))
    for dev, idx in plan.layers.items():
        assert idx == list(range(idx[0], idx[-1] + 1)), (dev, idx)
    assert set(plan.layers) == {"cuda:0", "cuda:1", "cuda:2", "cuda:3"}
    # No device is given more than its max memory.
    assert not plan.over_budget()
    for dev, n in plan.param_bytes.items():
        assert n <= plan.max_memory[dev], (dev, n)
    assert 130 * GiB < sum(plan.param_bytes.values()) < 133 * GiB  # 70.6e9 parameters in bf16
    # Embeddings on the first device, the final norm and lm_head on the last.
    assert plan.device_map["model.embed_tokens"] == 0
    assert plan.device_map["model.norm"] == plan.device_map["lm_head"] == 3
    # KV per token: 80 layers x 8 kv heads x 128 dims x (K, V) x 2 bytes, split as the layers are.
    assert sum(plan.kv_bytes_per_token.values()) == 80 * 8 * 128 * 2 * 2
    for dev, idx in plan.layers.items():
        assert plan.kv_bytes_per_token[dev] == len(idx) * 8 * 128 * 2 * 2


@pytest.mark.slow
def test_plan_command_prints_the_table(tmp_path):
    model = tmp_path / "llama-3-70b"
    model.mkdir()
    (model / "config.json").write_text(llama3_70b().to_json_string())
    out = tmp_path / "map.json"
    result = CliRunner().invoke(cli, ["plan", "--model", str(model / "config.json"), "--device-map", "auto",
                                      "--max-memory", FOUR_GPUS, "--dtype", "bf16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "80 decoder layers in bfloat16" in text
    for dev in ("cuda:0", "cuda:1", "cuda:2", "cuda:3"):
        assert dev in text
    assert "KV MiB/1k tok" in text and "312.5" in text  # 320 KiB per token in all
    written = json.loads(out.read_text())
    assert written["lm_head"] == 3 and parse_device_map(str(out)) == written


def test_plan_over_budget_exits_1(tmp_path):
    (tmp_path / "config.json").write_text(tiny_llama(vocab=4096, hidden=256).config.to_json_string())
    result = CliRunner().invoke(cli, ["plan", "--model", str(tmp_path), "--device-map", '{"": 0}',
                                      "--max-memory", "0=1MiB"])
    assert result.exit_code == 1
    assert "over --max-memory: cuda:0" in result.output


def test_explicit_map_plan_counts_every_byte_once():
    model = tiny_llama(vocab=97, layers=4)
    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
             "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}
    plan = plan_placement(model.config, json.dumps(split), dtype="float32")
    assert plan.layers == {"cuda:0": [0, 1], "cuda:1": [2, 3]}
    assert sum(plan.param_bytes.values()) == sum(memory_by_device(model).values())
    with pytest.raises(InvalidParameterError) as err:
        plan_placement(model.config, json.dumps({"model.layers": 0}), dtype="float32")
    assert err.value.field == "device_map"


# -- loading through a device map decodes exactly ----------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("placed")
    tiny_llama(seed=0, layers=3).save_pretrained(str(root / "target"))
    tiny_llama(seed=1, layers=1).save_pretrained(str(root / "drafter"))
    return root


def _greedy(target, drafter, width: int) -> list[list[int]]:
    engine = SpeculativeEngine(target, {"d": drafter}, eos_id=None, config=SpecConfig(k=3, tree_width=width))
    prompts = [[1, 5, 9], [2, 4, 6, 8, 10, 12, 14, 16, 18], [7] * 5, [3, 30, 60, 90]]
    return [s.output_ids for s in engine.generate(prompts, SamplingParams(max_new_tokens=20))]


@pytest.mark.parametrize("width", [1, 3], ids=["chain", "tree"])
def test_device_map_loading_decodes_as_plain_loading(saved, width):
    plain = _greedy(load_model(saved / "target", "cpu"), load_model(saved / "drafter", "cpu"), width)
    mapped = load_model(saved / "target", device_map={"": "cpu"})
    assert set(memory_by_device(mapped)) == {"cpu"} and not hasattr(mapped, "_hf_hook")  # one device: no hooks
    assert _greedy(mapped, load_model(saved / "drafter", "cpu"), width) == plain
    auto = load_model(saved / "target", device_map="auto", max_memory="cpu=1GiB")
    assert set(memory_by_device(auto)) == {"cpu"}
    assert _greedy(auto, load_model(saved / "drafter", "cpu"), width) == plain


def test_spread_model_paths_decode_as_plain_loading(saved, monkeypatch):
    """What a model spread over GPUs runs here on one CPU: accelerate's hooks on every block, no lean
    forward, every position projected onto the vocabulary."""
    from accelerate import dispatch_model

    plain = _greedy(load_model(saved / "target", "cpu"), load_model(saved / "drafter", "cpu"), 3)
    target = load_model(saved / "target", "cpu")
    blocks = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", **{f"model.layers.{i}": "cpu" for i in range(3)},
              "model.norm": "cpu", "lm_head": "cpu"}
    dispatch_model(target, blocks, main_device="cpu", force_hooks=True)
    assert hasattr(target.model.layers[1], "_hf_hook")
    monkeypatch.setattr(runner, "spread", lambda model: True)
    monkeypatch.setattr(lean_llama, "spread", lambda model: True)
    engine_runner = runner.ModelRunner(target, "target")
    assert not engine_runner.lean and not engine_runner._keep_rows
    assert _greedy(target, load_model(saved / "drafter", "cpu"), 3) == plain
