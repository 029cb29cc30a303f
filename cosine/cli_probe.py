"""``cosine worker-ready``: is one worker registered with a fresh heartbeat? A readiness probe (exit 0 or 1) for
container orchestrators, run inside the worker's own container under the worker's own ACL user."""

from __future__ import annotations

import click

from cosine import defaults
from cosine.cli_options import redis_options

ROLES = ("verifier", "drafter", "controller")


def worker_readiness(streams, name: str, role: str | None, max_age_s: float) -> tuple[bool, str]:
    """(ready, why) for worker ``name``: registered (its hash, of ``role`` if given) and its last heartbeat at most
    ``max_age_s`` old by the broker's clock. The heartbeat's time is the worker's score in the registry; a user
    that may not read the registry (the drafter's) falls back on the hash, which expires
    4 x ``WORKER_DEAD_AFTER_S`` after the last heartbeat."""
    import redis

    info = {k.decode(): v.decode() for k, v in streams.r.hgetall(streams.keys.worker(name)).items()}
    if not info:
        return False, f"{name} is not registered"
    if role is not None and info.get("role") != role:
        return False, f"{name} is a {info.get('role', 'worker of no role')}, not a {role}"
    try:
        cutoff = streams.server_ms() - int(max_age_s * 1000)
        fresh = streams.r.zrangebyscore(streams.keys.workers, cutoff, "+inf")
    except redis.exceptions.NoPermissionError:
        return True, f"{name} is registered (its heartbeat's age is not readable by this user)"
    if name.encode() not in fresh:
        return False, f"{name} is registered but its last heartbeat is older than {max_age_s:g} s"
    return True, f"{name} is registered with a heartbeat under {max_age_s:g} s old"


@click.command("worker-ready")
@redis_options
@click.option("--name", required=True, help="The worker's id (its --name) [env: COSINE_WORKER_READY_NAME].")
@click.option("--role", type=click.Choice(ROLES), default=None, help="Also require this role.")
@click.option("--max-age-s", type=click.FloatRange(min=0.1), default=defaults.WORKER_DEAD_AFTER_S,
              show_default=True, help="A heartbeat older than this is not fresh (the age at which workers count "
              "as dead).")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing; the exit status says it.")
def worker_ready(broker, name, role, max_age_s, quiet) -> None:
    """Exit 0 if worker NAME is registered with a fresh heartbeat, else 1 (also when Redis cannot be read): a
    readiness probe. Workers register once their models are loaded and deregister when they stop."""
    import redis

    from cosine.broker import Streams, connect
    from cosine.keys import Keys

    settings = broker
    try:
        r = connect(settings)
        try:
            ready, why = worker_readiness(Streams(r, Keys(settings.prefix)), name, role, max_age_s)
        finally:
            r.close()
    except redis.RedisError as exc:
        ready, why = False, f"cannot read Redis: {exc}"
    if not quiet:
        click.echo(f"{'ready' if ready else 'not ready'}: {why}", err=not ready)
    raise SystemExit(0 if ready else 1)
