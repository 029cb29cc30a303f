"""Where a model's modules go across devices, and what each device then holds, worked out on meta tensors.

A target too large for one GPU is spread over several by a *device map* (module name -> device). This
module parses what users write for one (``auto``, ``balanced``, ``balanced_low_0``, ``sequential`` or a
JSON object or file) and for the memory each device may give (``0=70GiB,1=70GiB,cpu=100GiB``), builds the
model from its config on the meta device (no weights, no GPU needed: a 70B model's plan takes seconds on
a laptop) and fills the devices with accelerate's ``infer_auto_device_map`` (whole decoder layers, in
order). :func:`~cosine.engine.models.load_model` loads with the very map :func:`device_map_for` returns,
so ``cosine plan`` shows what a worker will load.

The plan (:class:`PlacementPlan`) says per device: which layers, the bytes of parameters, and the KV cache
bytes per token of context (2 x kv heads x head dim x dtype bytes per layer placed there; layers offloaded
to ``cpu`` beside GPUs run, and cache, on the main GPU, as accelerate executes them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from accelerate import infer_auto_device_map, init_empty_weights
from accelerate.utils import convert_file_size_to_int, get_balanced_memory, get_max_memory
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from cosine.engine.families import attention_implementation
from cosine.engine.models import resolve_dtype
from cosine.errors import InvalidParameterError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_OFFLOAD = ("cpu", "disk")
_GiB = 1024**3
_MiB = 1024**2

# -- parsing what users write ---------------------------------------------------------------------------


def _device_value(value, module: str):
    """A device as a device map holds it: an accelerator index (int) or a device name; ``disk`` is refused
    (it needs an offload folder, and a verifier reading weights from disk every pass is not serving)."""
    if isinstance(value, bool):
        raise InvalidParameterError("device_map", f"{module!r}: {value!r} is not a device")
    if isinstance(value, int):
        if value < 0:
            raise InvalidParameterError("device_map", f"{module!r}: a GPU index is at least 0, got {value}")
        return value
    if isinstance(value, str):
        if value == "disk":
            raise InvalidParameterError("device_map", f"{module!r}: disk offload is not supported; give the "
                                                      "module a GPU or cpu")
        if value.isdigit():
            return int(value)
        try:
            torch.device(value)
        except RuntimeError as exc:
            raise InvalidParameterError("device_map", f"{module!r}: {value!r} is not a device ({exc})") from exc
        return value
    raise InvalidParameterError("device_map", f"{module!r}: {value!r} is not a device (a GPU index or a name "
                                              "such as cpu or cuda:1)")


def parse_device_map(spec) -> str | dict[str, int | str] | None:
    """``spec`` as a device map: ``None``/``""`` (none), one of :data:`STRATEGIES`, a JSON object (text or
    a dict) mapping module names to devices, or the path of a JSON file holding one. Anything else raises
    :class:`~cosine.errors.InvalidParameterError` naming ``device_map``."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, str):
        text = spec.strip()
        if text in STRATEGIES:
            return text
        if text.startswith("{"):
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InvalidParameterError("device_map", f"not valid JSON: {exc}") from exc
        elif pathlib.Path(text).is_file():
            try:
                spec = json.loads(pathlib.Path(text).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise InvalidParameterError("device_map", f"cannot read a JSON device map from {text}: {exc}") from exc
        else:
            raise InvalidParameterError("device_map", f"expected one of {', '.join(STRATEGIES)}, a JSON object "
                                                      f"or a JSON file, got {spec!r}")
    if not isinstance(spec, Mapping) or not spec:
        raise InvalidParameterError("device_map", f"expected a non-empty JSON object of module -> device, got "
                                                  f"{spec!r}")
    out: dict[str, int | str] = {}
    for module, value in spec.items():
        if not isinstance(module, str):
            raise InvalidParameterError("device_map", f"module names are strings, got {module!r}")
        out[module] = _device_value(value, module)
    return out


def _size(text, key) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    elif isinstance(text, str) and text.strip().isdigit():
        value = int(text.strip())
    else:
        try:
            value = convert_file_size_to_int(str(text).strip())
        except ValueError:
            value = -1
    if value <= 0:
        raise InvalidParameterError("max_memory", f"{key}: expected a size such as 70GiB or 40GB, got {text!r}")
    return value


def _memory_key(key) -> int | str:
    name = str(key).strip()
    if re.fullmatch(r"\d+", name):
        return int(name)
    if re.fullmatch(r"cuda:\d+", name):
        return int(name.split(":")[1])
    if name in ("cpu", "mps"):
        return name
    raise InvalidParameterError("max_memory", f"{key!r} is not a device: a GPU index (0, 1, ...), cuda:N, "
                                              "cpu or mps")


def parse_max_memory(spec) -> dict[int | str, int] | None:
    """``0=70GiB,1=70GiB,cpu=100GiB`` (or a dict) as bytes per device, keyed as accelerate keys them (GPU
    indices, ``cpu``, ``mps``). Units: ``GiB``/``MiB`` (binary), ``GB``/``MB`` (decimal), or plain bytes."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, str):
        items = []
        for part in spec.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise InvalidParameterError("max_memory", f"expected DEVICE=SIZE pairs such as 0=70GiB,cpu=100GiB, "
                                                          f"got {part.strip()!r}")
            key, _, size = part.partition("=")
            items.append((key, size))
    elif isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        raise InvalidParameterError("max_memory", f"expected DEVICE=SIZE pairs, got {spec!r}")
    out: dict[int | str, int] = {}
    for key, size in items:
        dev = _memory_key(key)
        if dev in out:
            raise InvalidParameterError("max_memory", f"device {key!r} given twice")
        out[dev] = _size(size, key)
    if not out:
        raise InvalidParameterError("max_memory", "no DEVICE=SIZE pairs given")
    return out


def device_label(device) -> str:
    """A device as the plan names it: GPU index ``1`` -> ``cuda:1``, ``cuda`` -> ``cuda:0``."""
    if isinstance(device, int):
        return f"cuda:{device}"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        return "cuda:0"
    return str(dev)


def _device_order(label: str) -> tuple:
    dev = torch.device(label)
    rank = {"cuda": 0, "xpu": 0, "mps": 1, "cpu": 2}.get(dev.type, 3)
    return rank, dev.type, dev.index or 0


# -- the model on meta tensors -------------------------------------------------------------------------


def load_config(model) -> PretrainedConfig:
    """A transformers config from a config object, a model folder or a ``config.json`` file."""
    if isinstance(model, PretrainedConfig):
        return model
    try:
        return AutoConfig.from_pretrained(str(model))
    except (OSError, ValueError) as exc:
        raise InvalidParameterError("model", f"no model config at {model}: {exc}") from exc


def empty_model(config: PretrainedConfig, dtype: torch.dtype) -> torch.nn.Module:
    """The causal LM of ``config`` on the meta device in ``dtype``, with the attention its family loads
    with (sizes and module names as :func:`~cosine.engine.models.load_model` would have them)."""
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                attn_implementation=attention_implementation(config))


@contextlib.contextmanager
def _quiet_accelerate() -> Iterator[None]:
    """accelerate warns once per GPU index it cannot see; a plan for GPUs this machine lacks is the point."""
    logger = logging.getLogger("accelerate.utils.modeling")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def device_map_for(model: torch.nn.Module, spec: str, max_memory: dict | None, dtype: torch.dtype) -> dict:
    """The module -> device map for strategy ``spec`` (see :data:`STRATEGIES`; ``auto`` = ``balanced``:
    layers spread evenly over the GPUs; ``balanced_low_0`` keeps GPU 0 light; ``sequential`` fills GPU 0,
    then GPU 1, ...). ``max_memory``: bytes per device (``None``: what the devices have free now). Decoder
    layers (the model's ``_no_split_modules``) are never split."""
    no_split = sorted(getattr(model, "_no_split_modules", None) or [])
    memory = dict(max_memory) if max_memory is not None else None
    with _quiet_accelerate():
        if spec == "sequential":
            memory = get_max_memory(memory)
        else:
            memory = get_balanced_memory(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype,
                                         low_zero=spec == "balanced_low_0")
        return dict(infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype))


def _owner(device_map: Mapping[str, int | str], name: str) -> int | str | None:
    """The device of module ``name``: that of the longest map entry containing it, else (a module split
    further) that of its first sub-entry."""
    best, found = -1, None
    for key, dev in device_map.items():
        if (key == "" or name == key or name.startswith(key + ".")) and len(key) > best:
            best, found = len(key), dev
    if found is None:
        found = next((dev for key, dev in device_map.items() if key.startswith(name + ".")), None)
    return found


def decoder_layers(model: torch.nn.Module) -> tuple[str, int]:
    """``(name, count)`` of the model's list of decoder layers (``model.layers`` for Llama)."""
    n = int(getattr(model.config.get_text_config(), "num_hidden_layers", 0) or 0)
    lists = [(name, len(m)) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    for name, count in lists:
        if count == n and name.split(".")[-1] in ("layers", "h", "blocks", "layer"):
            return name, count
    for name, count in lists:
        if count == n:
            return name, count
    raise InvalidParameterError("model", f"cannot find the {n} decoder layers of {type(model).__name__}")


def kv_bytes_per_token_per_layer(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Keys and values of one token in one layer: 2 x kv heads x head dim x bytes of ``dtype``."""
    text = config.get_text_config()
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


# -- the plan ------------------------------------------------------------------------------------------


@dataclass
class PlacementPlan:
    """Where a model goes. ``device_map``: module -> device as loading takes it; the rest is keyed by device
    label (``cuda:0``, ``cpu``), in device order: ``layers`` (decoder layer indices), ``param_bytes``
    (parameters and buffers), ``kv_bytes_per_token`` (KV cache per token of context, on the device that runs
    the layer), ``max_memory`` (the bytes allowed, where given)."""

    model: str
    dtype: torch.dtype
    device_map: dict[str, int | str]
    devices: list[str]
    layers: dict[str, list[int]]
    param_bytes: dict[str, int]
    kv_bytes_per_token: dict[str, int]
    max_memory: dict[str, int] = field(default_factory=dict)

    @property
    def layer_count(self) -> int:
        return sum(len(v) for v in self.layers.values())

    def over_budget(self) -> list[str]:
        """Devices given more parameter bytes than their ``max_memory``."""
        return [d for d in self.devices if d in self.max_memory and self.param_bytes.get(d, 0) > self.max_memory[d]]

    def table(self) -> str:
        """The plan as a text table: per device, its layers, parameter GiB (of its max memory) and KV MiB
        per 1k tokens of context."""
        rows = [("device", "layers", "count", "params GiB", "max GiB", "KV MiB/1k tok")]
        for dev in self.devices:
            idx = self.layers.get(dev, [])
            span = "-" if not idx else f"{idx[0]}-{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) else \
                ",".join(map(str, idx))
            cap = self.max_memory.get(dev)
            rows.append((dev, span, str(len(idx)), f"{self.param_bytes.get(dev, 0) / _GiB:.2f}",
                         "-" if cap is None else f"{cap / _GiB:.2f}",
                         f"{self.kv_bytes_per_token.get(dev, 0) * 1000 / _MiB:.1f}"))
        rows.append(("total", "", str(self.layer_count), f"{sum(self.param_bytes.values()) / _GiB:.2f}",
                     f"{sum(self.max_memory.values()) / _GiB:.2f}" if self.max_memory else "-",
                     f"{sum(self.kv_bytes_per_token.values()) * 1000 / _MiB:.1f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def plan_of(model: torch.nn.Module, device_map: Mapping[str, int | str], max_memory: dict | None = None,
            name: str = "model") -> PlacementPlan:
    """The plan of ``model`` (on meta tensors or loaded) placed by ``device_map``; raises
    :class:`~cosine.errors.InvalidParameterError` where the map leaves a parameter without a device."""
    dtype = model.get_input_embeddings().weight.dtype
    param_bytes: dict[str, int] = {}
    for pname, tensor in [*model.named_parameters(), *model.named_buffers()]:
        owner = _owner(device_map, pname.rpartition(".")[0])
        if owner is None:
            raise InvalidParameterError("device_map", f"{pname} is on no device of the map")
        label = device_label(owner)
        param_bytes[label] = param_bytes.get(label, 0) + tensor.numel() * tensor.element_size()
    accelerators = [d for d in set(device_map.values()) if d not in _OFFLOAD]
    main = accelerators[0] if accelerators else None  # accelerate runs offloaded modules on this device
    layers_name, count = decoder_layers(model)
    per_layer = kv_bytes_per_token_per_layer(model.config, dtype)
    layers: dict[str, list[int]] = {}
    kv: dict[str, int] = {}
    for i in range(count):
        owner = _owner(device_map, f"{layers_name}.{i}")
        layers.setdefault(device_label(owner), []).append(i)
        runs_on = device_label(main if owner in _OFFLOAD and main is not None else owner)
        kv[runs_on] = kv.get(runs_on, 0) + per_layer
    memory = {device_label(k): v for k, v in (max_memory or {}).items()}
    devices = sorted(set(param_bytes) | set(layers) | set(kv) | set(memory), key=_device_order)
    return PlacementPlan(name, dtype, dict(device_map), devices, layers, param_bytes, kv, memory)


def plan_placement(model, device_map="auto", max_memory=None, dtype: torch.dtype | str | None = None) -> PlacementPlan:
    """Plan where the causal LM of ``model`` (a config, a model folder or a ``config.json``) goes under
    ``device_map`` (a strategy or an explicit map, as :func:`parse_device_map` reads it) and ``max_memory``
    (as :func:`parse_max_memory` reads it), in ``dtype`` (``None``/``auto``: bfloat16 when the plan names a
    GPU, else float32, as loading picks), on meta tensors."""
    spec = parse_device_map(device_map) or "auto"
    memory = parse_max_memory(max_memory)
    names = list(memory or {}) + (list(spec.values()) if isinstance(spec, dict) else [])
    gpu = any(not (isinstance(d, str) and torch.device(d).type in ("cpu", "mps")) for d in names)
    dt = resolve_dtype(dtype, torch.device("cuda" if gpu or torch.cuda.is_available() else "cpu"))
    config = load_config(model)
    empty = empty_model(config, dt)
    placed = spec if isinstance(spec, dict) else device_map_for(empty, spec, memory, dt)
    return plan_of(empty, placed, memory, name=str(model) if not isinstance(model, PretrainedConfig) else
                   getattr(config, "name_or_path", "") or config.model_type)
