"""The ``cosine`` command line."""

from __future__ import annotations

import json
import logging
import sys

import click
import redis

from cosine import defaults
from cosine.cli_batch import batch
from cosine.cli_bench import bench
from cosine.cli_models import plan
from cosine.cli_observe import dashboard, metrics, serve, status
from cosine.cli_options import default_name, redis_options
from cosine.cli_probe import worker_ready
from cosine.cli_reliability import chaos, load
from cosine.cli_worker import worker
from cosine.errors import CosineError

log = logging.getLogger("cosine")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # transformers prints weight-loading progress bars; keep the console for our own output.
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _load_config(ctx: click.Context, _param, path: str | None):
    """Defaults from a TOML file: tables per command, e.g. [worker.drafter] batch-max = 32."""
    if not path:
        return path
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    with open(path, "rb") as f:
        data = tomllib.load(f)

    def norm(d):
        return {k.replace("-", "_"): norm(v) if isinstance(v, dict) else v for k, v in d.items()}

    ctx.default_map = {**(ctx.default_map or {}), **norm(data)}
    return path


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110,
                               "auto_envvar_prefix": "COSINE"})
@click.option("--config", type=click.Path(exists=True, dir_okay=False), callback=_load_config, is_eager=True,
              expose_value=False, help="TOML file with defaults for any command ([worker.verifier] k = 4, ...).")
@click.option("--log-level", default="INFO", show_default=True, help="DEBUG, INFO, WARNING or ERROR.")
def cli(log_level: str) -> None:
    """CoSine: collaborative speculative inference.

    Small domain drafters propose tokens, a large target model verifies them, and the output is exactly
    what the target alone would produce, only faster. Start with `cosine demo`.

    Every option can also come from an environment variable (COSINE_<COMMAND>_<OPTION>, e.g.
    COSINE_WORKER_VERIFIER_K=6; the Redis URL from COSINE_REDIS_URL) or from a TOML file (--config).
    """
    _setup_logging(log_level)


# -- zoo ----------------------------------------------------------------------------------------------
@cli.group()
def zoo() -> None:
    """Build and evaluate the demo model zoo (tokenizer, target, domain drafters)."""


@zoo.command("build")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Zoo folder [default: zoo/ or $COSINE_ZOO].")
@click.option("--time-budget-min", type=float, default=90.0, show_default=True,
              help="Wall-clock budget; training steps are cut to fit it (the cut is recorded).")
@click.option("--evaluate/--no-evaluate", default=True, show_default=True,
              help="Measure perplexity, step times and acceptance, and write the model card.")
def zoo_build(out: str | None, time_budget_min: float, evaluate: bool) -> None:
    """Train the zoo from the standard library's own text, offline (about 80 minutes on 2 cores)."""
    from cosine.zoo.build import ZooSettings, build_zoo

    manifest = build_zoo(out, ZooSettings(time_budget_min=time_budget_min), evaluate=evaluate)
    click.echo(f"zoo built in {manifest['build_seconds'] / 60:.1f} min")


@zoo.command("evaluate")
@click.option("--zoo", "zoo_path", type=click.Path(file_okay=False), default=None, help="Zoo folder.")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads for the step timings.")
def zoo_evaluate(zoo_path: str | None, threads: int) -> None:
    """Re-measure the zoo and rewrite MODEL_CARD.md."""
    from cosine.zoo.evaluate import evaluate_zoo
    from cosine.zoo.paths import zoo_dir

    manifest = evaluate_zoo(zoo_path, threads=threads)
    spec = manifest["evaluation"]["acceptance_matrix"]["specialisation"]
    for domain, s in spec.items():
        click.echo(f"{domain:8s} best={s['best']:8s} own={s['own']} next={s['next_best']} margin={s['margin']:+.1%}")
    click.echo(f"model card: {zoo_dir(zoo_path) / 'MODEL_CARD.md'}")


# -- bench (commands in cosine/cli_bench.py) ----------------------------------------------------------
cli.add_command(bench)
cli.add_command(chaos)
cli.add_command(load)
cli.add_command(plan)
for command in (status, serve, metrics, dashboard):  # cosine/cli_observe.py
    cli.add_command(command)
cli.add_command(worker)
cli.add_command(worker_ready)  # cosine/cli_probe.py: a readiness probe
cli.add_command(batch)  # cosine/cli_batch.py


@cli.command()
@click.option("--zoo", "zoo_path", type=click.Path(file_okay=False), default=None)
@click.option("--model", default=None, help="Target model folder [default: the zoo's target].")
@click.option("--drafter", "drafter_models", multiple=True, metavar="NAME=PATH",
              help="Drafter models to time (repeatable) [default: the zoo's drafters].")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default=None, help="Model dtype [default: float32 on CPU, bfloat16 on CUDA].")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads (as the verifier runs).")
@click.option("--time-budget-s", type=float, default=60.0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default="cost-model.json", show_default=True)
def profile(zoo_path, model, drafter_models, device, dtype, threads, time_budget_s, out) -> None:
    """Time real target and drafter forwards on this hardware and fit the scheduler's cost model (verify time
    by batch, context and tree tokens; draft time by batch and steps). Give it to verifiers with
    `cosine worker verifier --cost-model PATH`."""
    from cosine.profiling import run_profile
    from cosine.zoo import paths

    root = paths.zoo_dir(zoo_path)
    drafters = dict(item.split("=", 1) for item in drafter_models) or {
        d: str(paths.drafter_dir(d, root)) for d in paths.drafter_domains(root)}
    cost = run_profile(model or str(paths.target_dir(root)), drafters, device=device, dtype=dtype, threads=threads,
                       time_budget_s=time_budget_s)
    cost.save(out)
    click.echo(f"verify ms = {cost.verify_coefficients()}; draft ms = {cost.draft_coefficients()}")
    click.echo(f"wrote {out}")


# -- local deployment ---------------------------------------------------------------------------------
def _local_deployment(redis_url, prefix, verifiers, drafters, threads, device, dtype, zoo_path, log_dir=None,
                      verifier_args=(), drafter_args=(), controller=False, controller_args=(), dashboard_port=None,
                      broker=None):
    from cosine.deployment import Deployment, WorkerSpec

    specs = [WorkerSpec("verifier", f"verifier-{i}", list(verifier_args), threads) for i in range(verifiers)]
    specs += [WorkerSpec("drafter", f"drafter-{i}", list(drafter_args), threads) for i in range(drafters)]
    if controller:
        specs.append(WorkerSpec("controller", "controller", list(controller_args)))
    if dashboard_port is not None:
        specs.append(WorkerSpec("dashboard", "dashboard", ["--port", str(dashboard_port)]))
    return Deployment(specs, redis_url=redis_url, prefix=prefix, log_dir=log_dir, device=device, dtype=dtype,
                      zoo=zoo_path, broker=broker)


@cli.command()
@click.option("--redis-url", envvar="COSINE_REDIS_URL", default=None,
              help="Use this Redis [default: start a private one on loopback].")
@click.option("--prefix", default="cosine", show_default=True)
@click.option("--verifiers", type=int, default=1, show_default=True)
@click.option("--drafters", type=int, default=1, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads per worker.")
@click.option("--device", default=None)
@click.option("--dtype", default=None)
@click.option("--zoo", "zoo_path", default=None)
@click.option("--log-dir", default="runs/up", show_default=True, help="Worker logs.")
@click.option("--controller/--no-controller", default=True, show_default=True,
              help="Also start the controller (adaptive speculation length, cooperating drafters, batch limits).")
@click.option("--control-interval-ms", type=click.IntRange(50, 5000), default=None,
              help="The controller's sampling interval [default: `cosine controller`'s].")
@click.option("--dashboard-port", type=click.IntRange(0, 65535), default=defaults.DASHBOARD_PORT, show_default=True,
              help="Also start the dashboard on this port (taken: any free one; 0: none).")
@click.option("--broker-config", type=click.Path(exists=True, file_okay=False), default=None,
              help="Start Redis with this folder's redis.conf and users.acl (e.g. broker_config/); each role "
              "connects as its own ACL user.")
@click.option("--redis-ca", envvar="COSINE_REDIS_CA", type=click.Path(exists=True, dir_okay=False, resolve_path=True),
              default=None, help="With a rediss:// --redis-url: the CA certificate (PEM) that signed the server's.")
@click.option("--redis-cert", envvar="COSINE_REDIS_CERT",
              type=click.Path(exists=True, dir_okay=False, resolve_path=True), default=None,
              help="With a rediss:// --redis-url: the workers' client certificate (PEM).")
@click.option("--redis-key", envvar="COSINE_REDIS_KEY", type=click.Path(exists=True, dir_okay=False, resolve_path=True),
              default=None, help="With a rediss:// --redis-url: the client certificate's key (PEM).")
def up(redis_url, prefix, verifiers, drafters, threads, device, dtype, zoo_path, log_dir, controller,
       control_interval_ms, dashboard_port, broker_config, redis_ca, redis_cert, redis_key) -> None:
    """Start a whole local deployment (Redis, verifiers, drafters, a controller, the dashboard) until Ctrl-C /
    SIGTERM."""
    from cosine.local_redis import port_or_free
    from cosine.service.run_loop import stop_on_signals

    stop = stop_on_signals()
    controller_args = ["--interval-ms", str(control_interval_ms)] if control_interval_ms else []
    port = port_or_free(dashboard_port) if dashboard_port else None
    broker = None
    if redis_ca or redis_cert or redis_key:
        from cosine.broker import RedisSettings

        if not redis_url:
            raise click.UsageError("--redis-ca, --redis-cert and --redis-key are for a broker given with --redis-url "
                                   "(rediss://...); the private Redis speaks plain TCP on loopback")

        broker = RedisSettings(url=redis_url or "", tls_ca=redis_ca, tls_cert=redis_cert, tls_key=redis_key)
    dep = _local_deployment(redis_url, prefix, verifiers, drafters, threads, device, dtype, zoo_path, log_dir,
                            controller=controller, controller_args=controller_args, dashboard_port=port,
                            broker=broker)
    if broker_config:
        from cosine.broker_config import use_broker_config

        use_broker_config(dep, broker_config)
    with dep:
        from cosine.broker import redact_url

        shown = redact_url(dep.url)
        click.echo(f"CoSine is up: {shown} (prefix {prefix}); workers: {', '.join(dep.procs)}; logs in {log_dir}")
        if port:
            click.echo(f"dashboard: http://127.0.0.1:{port}/")
        tls = "".join(f" {arg}" for arg in dep.broker.command_line())
        click.echo(f"try: cosine generate --redis-url {shown}{tls} --stream 'def main('")
        drained: set[str] = set()
        while not stop.is_set():
            exited = {n: p.returncode for n, p in dep.procs.items() if p.poll() is not None}
            for name in sorted(set(exited) - drained):
                if exited[name] == 0:  # drained from the dashboard (or stopped cleanly): the rest goes on
                    click.echo(f"{name} exited cleanly (drained); the rest of the deployment goes on")
                    drained.add(name)
            failed = {n: rc for n, rc in exited.items() if rc != 0}
            if failed:
                click.secho(f"worker(s) failed: {', '.join(f'{n} (exit {rc})' for n, rc in failed.items())}",
                            fg="red", err=True)
                break
            stop.wait(0.5)
        click.echo("stopping ...")


# -- controller ---------------------------------------------------------------------------------------
def controller_options(f):
    """The controller's own options, defaults from :mod:`cosine.defaults`."""

    for opt in reversed([
        click.option("--name", default=None, help="Controller id in heartbeats and the control log [default: "
                     "controller-<host>-<pid>]."),
        click.option("--interval-ms", type=click.IntRange(50, 5000), default=defaults.CONTROL_INTERVAL_MS,
                     show_default=True, help="Sample queue depths and worker load, and decide, this often "
                     "(100-500 ms is sensible)."),
        click.option("--lease-ms", type=click.IntRange(100, 600_000), default=defaults.CONTROL_LEASE_MS,
                     show_default=True, help="Lock lease: a standby controller takes over this long after the "
                     "active one dies (at once after a clean stop)."),
    ]):
        f = opt(f)
    return f


@cli.command()
@redis_options
@controller_options
def controller(broker, name, interval_ms, lease_ms) -> None:
    """Run the controller: adaptive speculation control for a deployment.

    Every interval it samples each stream's depth (lag + pending from XINFO GROUPS, age of the oldest
    pending entry), the workers' heartbeats and stats, and decides the speculation length bounds
    (k_min..k_max), how many drafters cooperate on a request and the verifiers' batch limits: longer
    drafts and more drafters when the verifier idles, shorter ones when drafts pile up, bigger verifier
    batches when the verifier is the bottleneck. Decisions go to the versioned <prefix>:control hash that
    workers apply within one round, and to the <prefix>:control:log stream with the inputs they were based
    on (see `cosine status`).

    Run one or more: one is active (a lock in Redis), the others stand by and take over if it dies. If no
    controller runs, workers keep the last decision. Stops cleanly on SIGTERM / Ctrl-C.
    """
    from cosine.service.controller_service import ControllerSettings
    from workers import controller as controller_worker

    settings = ControllerSettings(worker_id=name or default_name("controller"), interval_ms=interval_ms,
                                  lease_ms=lease_ms)
    controller_worker.main(broker, settings)


@cli.command()
@click.argument("prompt")
@redis_options
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds.")
@click.option("--priority", type=int, default=0, show_default=True)
@click.option("--drafter", default=None, help="Pin a drafter model by name.")
@click.option("--speculation", default="adaptive", show_default=True,
              help="adaptive, off, or a number of draft positions per round.")
@click.option("--stream", "as_stream", is_flag=True, help="Print text as it commits.")
@click.option("--json", "as_json", is_flag=True, help="Print the result (text, token ids, stats) as JSON.")
def generate(prompt, broker, as_stream, as_json, **params) -> None:
    """Submit PROMPT to a running deployment (see `cosine up`) and print the output."""
    from cosine.client import Client

    params["stop"] = list(params["stop"])
    spec = params["speculation"]
    params["speculation"] = int(spec) if spec.isdigit() else spec
    with Client(settings=broker) as c:
        if as_stream:
            stats = None
            for chunk in c.stream(prompt, **params):
                click.echo(chunk.text, nl=False)
                stats = chunk.stats if chunk.finished else stats
            click.echo("")
            if as_json and stats:
                click.echo(json.dumps(stats))
            return
        res = c.generate(prompt, **params)
        if as_json:
            click.echo(json.dumps({"request_id": res.request_id, "text": res.text, "token_ids": res.token_ids,
                                   "finish_reason": res.finish_reason, "stats": res.stats}))
        else:
            click.echo(prompt + res.text)


@cli.command()
@click.option("--zoo", "zoo_path", type=click.Path(file_okay=False), default=None)
@click.option("--prompts-per-domain", type=int, default=3, show_default=True)
@click.option("--max-new-tokens", type=int, default=48, show_default=True)
@click.option("--drafters", type=int, default=1, show_default=True, help="Drafter worker processes.")
@click.option("--log-dir", default="runs/demo", show_default=True, help="Worker logs.")
@click.option("--local", is_flag=True, help="Single process instead: target alone vs coupled speculative decoding.")
def demo(zoo_path, prompts_per_domain, max_new_tokens, drafters, log_dir, local) -> None:
    """The main job: a local deployment (private Redis, a verifier and drafter processes), a mixed-domain
    workload through the client, the outputs and a summary; then a clean shutdown."""
    from cosine.demo import run_demo, run_local_demo

    if local:
        run_local_demo(zoo_path, prompts_per_domain, max_new_tokens)
    else:
        run_demo(zoo_path, prompts_per_domain, max_new_tokens, drafters, log_dir)


def main() -> None:
    from cosine.service.run_loop import exit_on_sigterm

    exit_on_sigterm()  # benchmarks and the demo stop the deployments they started; workers install their own
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except CosineError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        from cosine.broker import explain_connection_error

        click.secho(f"error: cannot reach Redis: {explain_connection_error(exc)}", fg="red", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
