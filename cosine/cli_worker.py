"""``cosine worker drafter`` and ``cosine worker verifier``: one worker process per node or GPU."""

from __future__ import annotations

import click

from cosine import defaults
from cosine.cli_options import bytes_option, default_name, model_options, redis_options
from cosine.errors import CosineError


@click.group()
def worker() -> None:
    """Run one worker process (one per node or GPU). Stops cleanly on SIGTERM / Ctrl-C."""


@worker.command("drafter")
@redis_options
@model_options
@click.option("--name", default=None, help="Worker id (stable names let a restarted worker find its backlog).")
@click.option("--model", "model", multiple=True, metavar="NAME=PATH[@DEVICE]",
              help="A drafter model (repeatable), on DEVICE if given (code=/m/code@cuda:1), else on --device  "
                   "[default: every zoo drafter, named by domain].")
@click.option("--batch-max", type=int, default=None, help="Jobs per batched drafting pass.")
@click.option("--window-ms", type=float, default=None, help="Wait this long for more jobs after the first.")
@click.option("--block-ms", type=int, default=None, help="Blocking read when idle.")
@click.option("--lookahead/--no-lookahead", default=None,
              help="While idle, draft each request's next round ahead for the outcomes expected of its pass and "
                   "send them to the verifier as bets.  [default: on]")
@click.option("--ahead-rows", type=click.IntRange(min=1), default=None,
              help=f"Drafter rows drafted ahead after each reply (the whole draft accepted for every request, then "
                   f"the likeliest other outcomes).  [default: {defaults.DRAFTER_AHEAD_ROWS}]")
@click.option("--ahead-depth", type=click.IntRange(min=1), default=None,
              help=f"Positions drafted ahead for an outcome other than the whole draft accepted.  "
                   f"[default: {defaults.DRAFTER_AHEAD_DEPTH}]")
@click.option("--vote-timeout-ms", type=float, default=None,
              help="Fusion across workers: wait this long per draft position for other workers' candidates.")
def worker_drafter(broker, zoo_path, device, dtype, threads, name, model, batch_max, window_ms, block_ms, lookahead,
                   ahead_rows, ahead_depth, vote_timeout_ms) -> None:
    """Host drafter models: consume this worker's draft jobs, reply with draft trees."""
    from cosine.cli_models import parse_model_entry
    from cosine.service.drafter_service import DrafterSettings
    from cosine.zoo import paths
    from workers import drafter as drafter_worker

    table, devices = {}, {}
    for item in model:
        try:
            key, path, on = parse_model_entry(item)
        except CosineError as exc:
            raise click.BadParameter(str(exc), param_hint="--model") from exc
        table[key] = path
        if on is not None:
            devices[key] = on
    if not table:
        root = paths.zoo_dir(zoo_path)
        table = {d: str(paths.drafter_dir(d, root)) for d in paths.drafter_domains(root)}
    settings = DrafterSettings(worker_id=name or default_name("drafter"))
    for attr, value in (("batch_max", batch_max), ("window_ms", window_ms), ("block_ms", block_ms),
                        ("lookahead", lookahead), ("ahead_rows", ahead_rows), ("ahead_depth", ahead_depth),
                        ("vote_timeout_ms", vote_timeout_ms)):
        if value is not None:
            setattr(settings, attr, value)
    drafter_worker.main(broker, settings, table, device, dtype, threads, devices=devices)


@worker.command("verifier")
@redis_options
@model_options
@click.option("--name", default=None, help="Worker id (stable names let a restarted worker find its backlog).")
@click.option("--model", "model", default=None, help="Target model folder [default: the zoo's target].")
@click.option("--device-map", default=None,
              help="Spread the target over devices: auto, balanced, sequential, or a JSON object or file of "
                   "module -> device (`cosine plan` shows the placement)  [default: all on --device].")
@click.option("--max-memory", default=None, metavar="DEV=SIZE,...",
              help="Memory per device for --device-map, e.g. 0=70GiB,1=70GiB,cpu=100GiB (alone: implies auto).")
@click.option("--quantization", type=click.Choice(["none", "8bit", "4bit"]), default="none", show_default=True,
              help="Load the target quantised through bitsandbytes (needs the library and a CUDA device).")
@click.option("--max-active", type=int, default=None, help="Requests held at once (batch limit).")
@click.option("--max-batch-tokens", type=int, default=None, help="Tokens per verification forward.")
@click.option("--admit-per-tick", type=int, default=None,
              help="New requests prefilled between two verification passes (the rest of a burst waits its turn).")
@click.option("--k", type=int, default=None, help="Draft positions per round (0 = no speculation).")
@click.option("--tree-width", type=int, default=None, help="Candidates per draft position (1 = chains).")
@click.option("--proposal", type=click.Choice(["onehot", "sampled"]), default=None,
              help="Drafts for sampling requests: deterministic (reproducible) or sampled with probabilities.")
@click.option("--draft-budget-min-ms", type=float, default=None, help="Never wait less than this for a draft.")
@click.option("--draft-budget-factor", type=float, default=None, help="Budget = factor x p90 draft round trip.")
@click.option("--reclaim-min-idle-s", type=float, default=None, help="Reclaim a dead verifier's requests after this.")
@click.option("--max-deliveries", type=int, default=None, help="Dead-letter a request delivered this often.")
@click.option("--kv-memory", "kv_memory", default=None, callback=bytes_option,
              help="Memory the target's KV cache may take (512MiB, 2GB, bytes): a request that could never fit is "
                   "refused, one that does not fit yet waits for room.  [default: no budget]")
@click.option("--cost-model", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Verification cost model written by `cosine profile` [default: built-in CPU numbers].")
@click.option("--routing/--no-routing", default=True, show_default=True,
              help="Expertise routing (off: each request keeps the one drafter its prompt fits best).")
@click.option("--fusion/--no-fusion", default=True, show_default=True,
              help="Several drafters per request in lockstep, fused into one token tree (off: one drafter).")
@click.option("--scheduling/--no-scheduling", default=True, show_default=True,
              help="Cost-model batch scheduling (off: verify every ready request by priority).")
@click.option("--adaptive/--no-adaptive", default=True, show_default=True,
              help="Adaptive speculation length per request (off: always --k).")
@click.option("--cross-process-fusion/--no-cross-process-fusion", "cross_fusion", default=None,
              help="Fuse experts hosted by different drafter workers: the job's worker leads the lockstep and "
                   "asks the others per draft position (one Redis round trip each).  [default: off]")
@click.option("--trace-passes", type=click.Path(dir_okay=False), default=None,
              help="Append a JSON line per verification pass to this file: its requests, depths and forward "
                   "time, and where the time since the previous pass went (prefill, Redis, waiting).")
def worker_verifier(broker, zoo_path, device, dtype, threads, name, model, device_map, max_memory, quantization,
                    routing, fusion, scheduling, adaptive, **overrides) -> None:
    """Own requests: verify drafts with the target model and stream the committed tokens."""
    from cosine.engine.placement_plan import parse_device_map, parse_max_memory
    from cosine.policy.steering import Switches
    from cosine.service.verifier_service import VerifierSettings
    from cosine.zoo import paths
    from workers import verifier as verifier_worker

    settings = VerifierSettings(worker_id=name or default_name("verifier"),
                                switches=Switches(routing, fusion, scheduling, adaptive),
                                **{attr: value for attr, value in overrides.items() if value is not None})
    target = model or str(paths.target_dir(paths.zoo_dir(zoo_path)))
    try:
        device_map, max_memory = parse_device_map(device_map), parse_max_memory(max_memory)
    except CosineError as exc:
        raise click.BadParameter(str(exc)) from exc
    verifier_worker.main(broker, settings, target, device, dtype, threads, device_map=device_map, max_memory=max_memory,
                         quantization=quantization)
