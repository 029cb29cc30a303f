"""Run a local Redis with a shipped broker configuration (``broker_config/``) and every role as its own ACL user.

``cosine up --broker-config broker_config/`` starts ``redis-server`` with that folder's ``redis.conf``, overriding
only where it listens (a free loopback port), where it keeps its data and its log (a temporary folder) and the
``aclfile`` (the folder's ``users.acl``, by absolute path), so the deployment runs under the same persistence
and the same users as production. Each worker connects as ``cosine-<role>`` with the password from
``users.acl``; the password travels in the worker's environment, never on its command line. The ACL key
patterns name the default prefix ``cosine:``; another prefix gets a rewritten copy of the file.
"""

from __future__ import annotations

import logging
import pathlib
from urllib.parse import quote

import redis

from cosine.errors import CosineError
from cosine.local_redis import LocalRedis, find_redis_server

log = logging.getLogger(__name__)

ROLES = ("verifier", "drafter", "controller", "producer", "dashboard", "celery", "maintenance", "admin")
SHIPPED_PREFIX = "cosine"


class BrokerConfigError(CosineError):
    """A broker configuration folder that cannot be used as given."""


def user_for(role: str) -> str:
    """The ACL user a role connects as (``users.acl`` names them ``cosine-<role>``)."""
    return f"cosine-{role}"


def read_passwords(acl_file: str | pathlib.Path) -> dict[str, str]:
    """Each user's clear-text password (its first ``>password`` rule) in an ACL file; users given only hashed
    passwords (``#<sha256>``) are left out."""
    out: dict[str, str] = {}
    for line in pathlib.Path(acl_file).read_text().splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "user":
            continue
        password = next((w[1:] for w in words[2:] if w.startswith(">")), None)
        if password is not None:
            out[words[1]] = password
    return out


def role_url(host: str, port: int, role: str, password: str | None = None, db: int = 0) -> str:
    """``redis://cosine-<role>[:password]@host:port/db`` (the password percent-encoded)."""
    auth = user_for(role) + (f":{quote(password, safe='')}" if password is not None else "")
    return f"redis://{auth}@{host}:{port}/{db}"


class BrokerConfig:
    """A ``broker_config``-style folder: ``redis.conf``, ``users.acl`` and the passwords in it."""

    def __init__(self, folder: str | pathlib.Path) -> None:
        self.folder = pathlib.Path(folder).resolve()
        self.conf = self.folder / "redis.conf"
        self.acl = self.folder / "users.acl"
        for f in (self.conf, self.acl):
            if not f.is_file():
                raise BrokerConfigError(f"{f} is missing: a broker config folder holds redis.conf and users.acl")
        self.passwords = read_passwords(self.acl)

    def password(self, role: str) -> str:
        try:
            return self.passwords[user_for(role)]
        except KeyError:
            raise BrokerConfigError(f"{self.acl} gives no clear-text password (>...) for {user_for(role)}") from None

    def acl_for_prefix(self, prefix: str, into: pathlib.Path) -> pathlib.Path:
        """The ACL file for key prefix ``prefix``: the shipped one, or a copy under ``into`` with its
        ``cosine:`` key patterns moved to ``prefix:``."""
        if prefix == SHIPPED_PREFIX:
            return self.acl
        text = self.acl.read_text().replace(f"~{SHIPPED_PREFIX}:", f"~{prefix}:")
        out = into / "users.acl"
        out.write_text(text)
        out.chmod(0o600)
        return out


class ConfiguredRedis(LocalRedis):
    """A private ``redis-server`` started from a broker config (its ``redis.conf`` and ACL users); it is
    pinged and stopped as ``cosine-admin``. ``url`` is the producer's, without its password."""

    def __init__(self, config: BrokerConfig, prefix: str = SHIPPED_PREFIX, port: int | None = None,
                 data_dir: str | None = None) -> None:
        super().__init__(port=port, appendonly=True, data_dir=data_dir, appendfsync="everysec")
        self.config = config
        self.prefix = prefix

    def server_args(self) -> list[str]:
        acl = self.config.acl_for_prefix(self.prefix, self.dir)
        return [find_redis_server(), str(self.config.conf), "--port", str(self.port), "--dir", str(self.dir),
                "--aclfile", str(acl), "--logfile", str(self.dir / "redis.log"), "--daemonize", "no"]

    def admin_client(self, **kwargs) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, username=user_for("admin"),
                           password=self.config.password("admin"), **kwargs)

    def url_for(self, role: str, with_password: bool = False) -> str:
        return role_url("127.0.0.1", self.port, role, self.config.password(role) if with_password else None)

    @property
    def url(self) -> str:
        return self.url_for("producer")


def use_broker_config(dep, folder: str | pathlib.Path) -> None:
    """Make ``dep`` (a :class:`~cosine.deployment.Deployment` that starts its own Redis) start Redis from the
    broker config in ``folder`` and run each worker as its role's ACL user."""
    if dep.local is None:
        raise BrokerConfigError("--broker-config starts its own Redis: leave out --redis-url")
    config = BrokerConfig(folder)
    dep.local.close()  # not started yet: this only removes its data folder
    dep.local = ConfiguredRedis(config, dep.prefix)
    for spec in dep.specs:
        dep.role_urls[spec.role] = dep.local.url_for(spec.role)
        spec.env = {**spec.env, "COSINE_REDIS_PASSWORD": config.password(spec.role)}
    dep.role_urls["monitor"] = dep.local.url_for("dashboard", with_password=True)  # this process's own reads
    log.info("broker config %s: each role connects as its own user; clients connect as %s with the password "
             "from users.acl (COSINE_REDIS_PASSWORD)", config.folder, user_for("producer"))


__all__ = ["BrokerConfig", "BrokerConfigError", "ConfiguredRedis", "ROLES", "read_passwords", "role_url",
           "use_broker_config", "user_for"]
