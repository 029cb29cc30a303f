"""``cosine plan`` (where a model's layers would go over GPUs, worked out on meta tensors) and the parsing of
drafter workers' ``--model NAME=PATH[@DEVICE]`` (see docs/models.md, "Loading and placement")."""

from __future__ import annotations

import json
import pathlib

import click

from cosine.errors import InvalidParameterError


def parse_model_entry(item: str) -> tuple[str, str, str | None]:
    """``NAME=PATH[@DEVICE]`` as ``(name, path, device or None)``. The device suffix is what follows the last
    ``@`` when it holds no path separator (``code=/m/code@cuda:1``); an invalid device raises
    :class:`~cosine.errors.InvalidParameterError` naming ``model``."""
    name, sep, path = item.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise InvalidParameterError("model", f"expected NAME=PATH or NAME=PATH@DEVICE, got {item!r}")
    device = None
    head, at, tail = path.rpartition("@")
    if at and head and "/" not in tail and "\\" not in tail:
        from cosine.engine.models import resolve_device

        try:
            resolve_device(tail)
        except InvalidParameterError as exc:
            raise InvalidParameterError("model", f"{item!r}: {tail!r} is not a device (cpu, cuda, cuda:1, ...)") \
                from exc
        path, device = head, tail
    return name.strip(), path, device


@click.command()
@click.option("--model", "model", required=True, metavar="PATH",
              help="Model folder or config.json: only the config is read, no weights.")
@click.option("--device-map", default="auto", show_default=True,
              help="auto, balanced, balanced_low_0, sequential, or a JSON object or file of module -> device.")
@click.option("--max-memory", default=None, metavar="DEV=SIZE,...",
              help="Memory per device, e.g. 0=40GiB,1=40GiB,cpu=64GiB (GPUs by index)  [default: what this "
                   "machine's devices have free].")
@click.option("--dtype", default="auto", show_default=True,
              help="float32, bfloat16, float16 (auto: bf16 when the plan names a GPU, else fp32).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Also write the device map as JSON (a verifier takes it with --device-map FILE).")
def plan(model, device_map, max_memory, dtype, out) -> None:
    """Plan where a model's layers go across devices, as `cosine worker verifier --device-map` would load
    it: per device its layers, parameter GiB and KV cache MiB per 1k tokens of context. Works on meta
    tensors, so it needs neither the weights nor the GPUs. Exits 1 when a device is given more than its
    --max-memory."""
    from cosine.engine.placement_plan import plan_placement

    try:
        placed = plan_placement(model, device_map, max_memory, None if dtype == "auto" else dtype)
    except InvalidParameterError as exc:
        raise click.BadParameter(str(exc), param_hint=f"--{exc.field.replace('_', '-')}") from exc
    dtype_name = str(placed.dtype).removeprefix("torch.")
    click.echo(f"{model}: {placed.layer_count} decoder layers in {dtype_name}")
    click.echo(placed.table())
    offloaded = placed.layers.get("cpu")
    if offloaded and any(d != "cpu" for d in placed.layers):
        click.echo(f"note: the {len(offloaded)} layers on cpu run on a GPU (their KV cache is counted there), "
                   "their weights copied over on every pass")
    if out:
        pathlib.Path(out).write_text(json.dumps(placed.device_map, indent=1) + "\n")
        click.echo(f"device map written to {out}")
    over = placed.over_budget()
    if over:
        click.echo(f"over --max-memory: {', '.join(over)}", err=True)
        raise SystemExit(1)
