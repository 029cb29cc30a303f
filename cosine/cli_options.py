"""Options shared by the ``cosine`` commands: where the broker is, which models and devices, sizes, names."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import click

REDIS_PARAMS = ("redis_url", "prefix", "sentinels", "sentinel_master", "username", "password", "password_file",
                "redis_ca", "redis_cert", "redis_key", "cluster")


def redis_options(f):
    """Where the broker is: URL (redis://, rediss://, unix://; user:password@ for ACL users) or Sentinel, TLS
    files and credentials. The command receives them as one ``broker`` argument (a
    :class:`~cosine.broker.RedisSettings`)."""
    from cosine import defaults

    @functools.wraps(f)
    def command(*args, **kwargs):
        return f(*args, broker=redis_settings(**{name: kwargs.pop(name) for name in REDIS_PARAMS}), **kwargs)

    path = click.Path(exists=True, dir_okay=False, resolve_path=True)  # absolute: workers may run elsewhere
    for opt in reversed([
        click.option("--redis-url", envvar="COSINE_REDIS_URL", default=defaults.REDIS_URL, show_default=True,
                     help="Redis URL; rediss:// for TLS, redis://user:password@host:port/db for ACL users."),
        click.option("--prefix", envvar="COSINE_PREFIX", default=defaults.KEY_PREFIX, show_default=True,
                     help="Key prefix: deployments sharing one Redis use different prefixes."),
        click.option("--sentinels", envvar="COSINE_SENTINELS", default=None,
                     help="Sentinel addresses host:port,host:port (then the master comes from Sentinel; the URL "
                     "only gives the db, and rediss:// or a TLS file turns TLS on)."),
        click.option("--sentinel-master", envvar="COSINE_SENTINEL_MASTER", default="mymaster", show_default=True),
        click.option("--cluster", envvar="COSINE_REDIS_CLUSTER", is_flag=True, default=False,
                     help="The URL is a node of a Redis Cluster (the prefix becomes a hash tag: one slot)."),
        click.option("--username", envvar="COSINE_REDIS_USERNAME", default=None, help="ACL user."),
        click.option("--password", envvar="COSINE_REDIS_PASSWORD", default=None,
                     help="ACL password (better from $COSINE_REDIS_PASSWORD or --password-file: a flag shows in the "
                     "process list)."),
        click.option("--password-file", envvar="COSINE_REDIS_PASSWORD_FILE", type=path, default=None,
                     help="Read the ACL password from this file (its first line)."),
        click.option("--redis-ca", envvar="COSINE_REDIS_CA", type=path, default=None,
                     help="TLS: the CA certificate (PEM) that signed the server's [default: the system's CAs]."),
        click.option("--redis-cert", envvar="COSINE_REDIS_CERT", type=path, default=None,
                     help="TLS: this client's certificate (PEM), for servers with tls-auth-clients."),
        click.option("--redis-key", envvar="COSINE_REDIS_KEY", type=path, default=None,
                     help="TLS: this client's private key (PEM)."),
    ]):
        command = opt(command)
    return command


def read_secret(path: str | None, env: str) -> str | None:
    """A secret from a file (first line, stripped) or else from the environment variable ``env``."""
    if path:
        return Path(path).read_text().splitlines()[0].strip() if Path(path).stat().st_size else None
    return os.environ.get(env) or None


def redis_settings(redis_url, prefix, sentinels=None, sentinel_master="mymaster", username=None, password=None,
                   password_file=None, redis_ca=None, redis_cert=None, redis_key=None, cluster=False):
    """The :class:`~cosine.broker.RedisSettings` for the values of :func:`redis_options`."""
    from cosine.broker import RedisSettings

    if password_file:
        if password:
            raise click.UsageError("give the password once: --password (or $COSINE_REDIS_PASSWORD) or "
                                   "--password-file")
        password = read_secret(password_file, "COSINE_REDIS_PASSWORD")
    return RedisSettings(url=redis_url, prefix=prefix, sentinels=sentinels, sentinel_master=sentinel_master,
                         username=username, password=password, tls_ca=redis_ca,
                         tls_cert=redis_cert, tls_key=redis_key, cluster=cluster)


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
