"""Loading target and drafter models (any Hugging Face causal LM) with device and dtype choices."""

from __future__ import annotations

import logging
import pathlib

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from cosine.engine.families import attention_implementation
from cosine.engine.vocab import check_compatible
from cosine.errors import InvalidParameterError, ModelLoadError

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise InvalidParameterError("device", str(exc)) from exc


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (fast there, and exact), bfloat16 on GPUs."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InvalidParameterError("dtype", f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


QUANTIZATIONS = ("8bit", "4bit")


def quantization_config(quantization: str | None, dtype: torch.dtype):
    """The bitsandbytes config of ``--quantization 8bit|4bit`` (``None``/``none``: no quantisation). Raises
    :class:`ModelLoadError` saying what is missing where bitsandbytes does not import or no CUDA device is
    visible (it quantises on CUDA devices only)."""
    if quantization in (None, "", "none"):
        return None
    if quantization not in QUANTIZATIONS:
        raise InvalidParameterError("quantization", f"expected one of {', '.join(QUANTIZATIONS)} or none, "
                                                    f"got {quantization!r}")
    missing = []
    try:
        import bitsandbytes  # noqa: F401  (transformers loads through it; only its presence is checked here)
    except Exception as exc:  # not installed, or installed without its native library
        missing.append(f"the bitsandbytes library does not import ({type(exc).__name__}: {exc}; "
                       "pip install bitsandbytes)")
    if not torch.cuda.is_available():
        missing.append("no CUDA device is visible")
    if missing:
        raise ModelLoadError(f"--quantization {quantization} loads through bitsandbytes on a CUDA device: "
                             + "; ".join(missing))
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)


def spread(model: torch.nn.Module) -> bool:
    """Whether ``model`` was dispatched over several devices (accelerate's hooks move each module's inputs
    to its device; code that calls submodules directly must not assume one device)."""
    return len({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}) > 1


def input_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's input embedding, where its inputs go (for a module offloaded to the CPU by
    accelerate, whose weights wait on the meta device, the device it runs on)."""
    embed = model.get_input_embeddings()
    if embed.weight.device.type == "meta" and getattr(embed, "_hf_hook", None) is not None:
        return torch.device(embed._hf_hook.execution_device)
    return embed.weight.device


def load_model(path: str | pathlib.Path, device: str | None = None, dtype: str | torch.dtype | None = None,
               device_map=None, max_memory=None, quantization: str | None = None):
    """Load a causal LM for inference with the attention its family needs
    (:func:`~cosine.engine.families.attention_implementation`); raises :class:`ModelLoadError` with the path
    on failure.

    ``device``: the one device to load onto (``None``/``auto``: CUDA if any). ``device_map``: spread the model
    over devices instead (``auto``, ``balanced``, ``balanced_low_0``, ``sequential``, or a module -> device
    JSON object or file: :func:`~cosine.engine.placement_plan.parse_device_map`), each given at most
    ``max_memory`` (``0=70GiB,1=70GiB,cpu=100GiB``; given alone, it implies ``auto``). A strategy is turned
    into a map on meta tensors first (:func:`~cosine.engine.placement_plan.device_map_for`), so the map
    loaded is the one ``cosine plan`` prints. ``quantization``: ``8bit`` or ``4bit`` through bitsandbytes
    (CUDA only; with no device map, onto ``device``)."""
    from cosine.engine import placement_plan

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    spec = placement_plan.parse_device_map(device_map)
    memory = placement_plan.parse_max_memory(max_memory)
    if memory is not None and spec is None:
        spec = "auto"
    quant = quantization_config(quantization, dt)
    kwargs: dict = {}
    try:
        config = AutoConfig.from_pretrained(str(path))
        attention = attention_implementation(config)
        if quant is not None:
            if spec is None and dev.type != "cuda":
                raise ModelLoadError(f"--quantization {quantization} needs a CUDA device, not {dev}")
            kwargs = {"quantization_config": quant, "device_map": spec if spec is not None else {"": str(dev)}}
            if memory is not None:
                kwargs["max_memory"] = memory
        elif spec is not None:
            kwargs["device_map"] = spec if isinstance(spec, dict) else placement_plan.device_map_for(
                placement_plan.empty_model(config, dt), spec, memory, dt)
            offloaded = sorted(k for k, v in kwargs["device_map"].items() if v == "disk")
            if offloaded:
                raise ModelLoadError(f"{path} does not fit in --max-memory: {', '.join(offloaded)} would go to "
                                     "disk; give the devices more memory or add cpu=SIZE")
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dt, attn_implementation=attention, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a causal LM from {path}: {exc}") from exc
    if "device_map" not in kwargs:
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    return model


def memory_by_device(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of parameters and buffers per device the model holds them on."""
    out: dict[str, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        key = str(tensor.device)
        out[key] = out.get(key, 0) + tensor.numel() * tensor.element_size()
    return out


def describe_memory(models: dict[str, torch.nn.Module]) -> str:
    """Each model's parameter memory by device, as ``name@device=MiB`` (a spread model lists each device):
    ``code@cuda:1=480.2MiB,math@cuda:0=480.2MiB``."""
    return ",".join(f"{name}@{dev}={n / 2**20:.1f}MiB" for name, model in models.items()
                    for dev, n in memory_by_device(model).items())


def load_tokenizer(path: str | pathlib.Path, required: bool = True) -> PreTrainedTokenizerBase | None:
    """The tokenizer in a model folder; with ``required=False``, None when the folder has none."""
    if not required and not any((pathlib.Path(path) / n).exists() for n in ("tokenizer.json", "tokenizer_config.json")):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {path}: {exc}") from exc


def check_drafter(target_name: str, target, target_tok, drafter_name: str, drafter, drafter_tok) -> None:
    """Refuse a drafter that does not speak the target's token ids, naming both: compared by tokenizer
    (:mod:`cosine.engine.vocab`) when both have one, else by vocabulary size."""
    if target_tok is not None and drafter_tok is not None:
        check_compatible(target_name, target_tok, drafter_name, drafter_tok)
        return
    t, d = int(target.config.vocab_size), int(drafter.config.vocab_size)
    if t != d:
        raise ModelLoadError(f"drafter {drafter_name} has {d} ids but target {target_name} has {t} ids and "
                             "neither names a tokenizer to compare; a drafter must share the target's tokenizer")
