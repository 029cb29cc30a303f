"""Options shared by the ``cosine`` commands: where the broker is, which models and devices, sizes, names."""

from __future__ import annotations

import click


def redis_options(f):
    """Where the broker is: URL (redis://, rediss://, unix://; user:password@ for ACL users) or Sentinel."""
    from cosine import defaults

    for opt in reversed([
        click.option("--redis-url", envvar="COSINE_REDIS_URL", default=defaults.REDIS_URL, show_default=True,
                     help="Redis URL; rediss:// for TLS, redis://user:password@host:port/db for ACL users."),
        click.option("--prefix", envvar="COSINE_PREFIX", default=defaults.KEY_PREFIX, show_default=True,
                     help="Key prefix: deployments sharing one Redis use different prefixes."),
        click.option("--sentinels", envvar="COSINE_SENTINELS", default=None,
                     help="Sentinel addresses host:port,host:port (then the master comes from Sentinel)."),
        click.option("--sentinel-master", envvar="COSINE_SENTINEL_MASTER", default="mymaster", show_default=True),
        click.option("--username", envvar="COSINE_REDIS_USERNAME", default=None, help="ACL user."),
        click.option("--password", envvar="COSINE_REDIS_PASSWORD", default=None,
                     help="ACL password (better from $COSINE_REDIS_PASSWORD: a flag shows in the process list)."),
    ]):
        f = opt(f)
    return f


def redis_settings(redis_url, prefix, sentinels, sentinel_master, username, password):
    from cosine.broker import RedisSettings

    return RedisSettings(url=redis_url, prefix=prefix, sentinels=sentinels, sentinel_master=sentinel_master,
                         username=username, password=password)


def model_options(f):
    for opt in reversed([
        click.option("--zoo", "zoo_path", type=click.Path(file_okay=False), default=None,
                     help="Demo zoo folder [default: zoo/ or $COSINE_ZOO]."),
        click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... (auto: cuda if any)."),
        click.option("--dtype", default="auto", show_default=True, help="float32, bfloat16, float16 (auto: fp32 on "
                     "CPU, bf16 on CUDA)."),
        click.option("--threads", type=int, default=None, help="torch CPU threads [default: torch's choice]."),
    ]):
        f = opt(f)
    return f


def bytes_option(_ctx, param, value):
    """A size such as ``512MiB``, ``2GB`` or a number of bytes, as an int (None stays None)."""
    if value is None:
        return None
    from cosine.units import parse_bytes

    try:
        return parse_bytes(value, param.name)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def default_name(role: str) -> str:
    import os
    import socket

    return f"{role}-{socket.gethostname().split('.')[0]}-{os.getpid()}"
