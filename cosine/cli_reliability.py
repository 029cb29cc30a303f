"""``cosine chaos`` and ``cosine load``: a local deployment under faults and under overload, checked (see
docs/guarantees.md)."""

from __future__ import annotations

import json
import pathlib

import click


@click.command()
@click.option("--zoo", "zoo_path", type=click.Path(file_okay=False), default=None)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the faults, their targets and timing.")
@click.option("--duration", "duration_s", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="Seconds of load under faults (then the requests in flight finish).")
@click.option("--clients", type=click.IntRange(min=1), default=4, show_default=True,
              help="Closed-loop client threads (greedy and seeded-sampling requests alternate).")
@click.option("--fault-every", "fault_every", type=(float, float), default=(3.0, 8.0), show_default=True,
              help="The injector waits a random time in this range (seconds) between faults.")
@click.option("--out", type=click.Path(file_okay=False), default="chaos-results", show_default=True)
def chaos(zoo_path, seed, duration_s, clients, fault_every, out) -> None:
    """Run a local deployment (2 verifiers, 3 drafters, controller, Redis with AOF everysec) under load while a
    seeded injector kills and restarts workers, pauses a verifier past its heartbeat, kills Redis, kills the
    controller and removes a drafter; then check that every request completed exactly or failed explicitly
    and that nothing was left behind. Writes chaos.json, chaos.md and the workers' logs to --out."""
    from cosine.chaos import ChaosConfig, markdown, run_chaos

    folder = pathlib.Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    report = run_chaos(ChaosConfig(seed=seed, duration_s=duration_s, clients=clients, fault_every_s=fault_every,
                                   zoo=zoo_path, log_dir=str(folder / "logs")))
    (folder / "chaos.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (folder / "chaos.md").write_text(table)
    click.echo(table)
    bad = report["lost"] or report["outputs"]["mismatched"] or report["worker_crashes"]
    if bad:
        raise SystemExit(1)


@click.command()
@click.option("--zoo", "zoo_path", type=click.Path(file_okay=False), default=None)
@click.option("--multiple", "multiples", type=click.FloatRange(min=0.1), multiple=True, default=(2.0, 5.0),
              show_default=True, help="Offered load as multiples of the measured saturation rate (repeatable).")
@click.option("--seconds", type=click.FloatRange(min=1), default=30.0, show_default=True,
              help="Seconds of Poisson arrivals per level.")
@click.option("--max-outstanding", type=click.IntRange(min=1), default=32, show_default=True,
              help="Requests the deployment may hold (queued or in flight) before a submit is refused.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="load-results", show_default=True)
def load(zoo_path, multiples, seconds, max_outstanding, seed, out) -> None:
    """Open-loop overload: measure the saturation rate, then offer Poisson arrivals at multiples of it; report
    accepted and refused (OverloadedError) rates, lost requests (must be 0), latency, goodput and memory."""
    from cosine.load import markdown, run_load

    folder = pathlib.Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    report = run_load(tuple(multiples), seconds, max_outstanding=max_outstanding, seed=seed, zoo=zoo_path)
    (folder / "load.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (folder / "load.md").write_text(table)
    click.echo(table)
    if any(level["lost"] for level in report["levels"].values()):
        raise SystemExit(1)
