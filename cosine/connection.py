"""How to reach the broker: :class:`RedisSettings` (URL, Sentinel, Cluster, TLS files, credentials) and the
blocking and asyncio clients built from them. Replies stay bytes (msgpack payloads); secrets never reach a
log line (:func:`redact_url`), and a failed connection is explained (:func:`explain_connection_error`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
import redis.asyncio as aioredis
from redis.connection import parse_url

from cosine import defaults
from cosine.errors import CosineError


class BrokerSettingsError(CosineError):
    """Broker settings that cannot work together (TLS files without TLS, a certificate without its key)."""


@dataclass
class RedisSettings:
    """Where the broker is and how to talk to it (see :mod:`cosine.defaults` for the timeouts).

    TLS is on for a ``rediss://`` URL: ``tls_ca`` is the CA that signed the server's certificate (else the
    system's CAs), ``tls_cert`` / ``tls_key`` the client's certificate and key for a server that asks for one
    (``tls-auth-clients yes``). Through Sentinel, TLS is on for a ``rediss://`` URL or any TLS file, and applies
    to the sentinels and the master alike."""

    url: str = defaults.REDIS_URL
    prefix: str = defaults.KEY_PREFIX
    sentinels: str | None = None  # "host:port,host:port"; then ``url`` only gives the db (and rediss: TLS)
    sentinel_master: str = "mymaster"
    username: str | None = None
    password: str | None = None
    socket_timeout_s: float = defaults.SOCKET_TIMEOUT_S
    tls_ca: str | None = None  # PEM file: the CA that signed the server's certificate
    tls_cert: str | None = None  # PEM file: this client's certificate (servers with tls-auth-clients yes)
    tls_key: str | None = None  # PEM file: this client's private key
    cluster: bool = False  # a Redis Cluster: ``url`` is any node; the prefix becomes a hash tag

    def __post_init__(self) -> None:
        """On a Redis Cluster every key of the deployment carries the prefix as one hash tag (``{cosine}:...``), so
        each transaction (a verifier's pass, a drafter's reply, a cancel) touches one slot."""
        if self.cluster and not (self.prefix.startswith("{") and self.prefix.endswith("}")):
            self.prefix = "{" + self.prefix + "}"

    @property
    def tls(self) -> bool:
        """Whether connections use TLS."""
        files = bool(self.tls_ca or self.tls_cert or self.tls_key)
        return self.url.lower().startswith("rediss://") or (bool(self.sentinels) and files)

    def describe(self) -> str:
        """Where the broker is, safe to log and show (no password; TLS file paths at most)."""
        where = f"sentinel {self.sentinels} ({self.sentinel_master})" if self.sentinels else redact_url(self.url)
        where += " (cluster)" if self.cluster else ""
        if not self.tls:
            return where
        files = ", ".join(f"{name} {path}" for name, path in (("CA", self.tls_ca), ("cert", self.tls_cert)) if path)
        return f"{where} over TLS" + (f" ({files})" if files else "")

    def command_line(self) -> list[str]:
        """The ``cosine`` options for these settings besides the URL, the prefix and the credentials (a worker's
        password travels in its environment, never on its command line)."""
        args: list[str] = []
        if self.sentinels:
            args += ["--sentinels", self.sentinels, "--sentinel-master", self.sentinel_master]
        if self.cluster:
            args.append("--cluster")
        for flag, path in (("--redis-ca", self.tls_ca), ("--redis-cert", self.tls_cert), ("--redis-key", self.tls_key)):
            if path:
                args += [flag, path]
        return args


def _tls_options(settings: RedisSettings) -> dict:
    """redis-py's TLS arguments for ``settings`` (none without TLS). The server's certificate is always
    verified, and its name checked against the host connected to."""
    files = {"ssl_ca_certs": settings.tls_ca, "ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key}
    files = {k: v for k, v in files.items() if v}
    if not settings.tls:
        if files:
            raise BrokerSettingsError("TLS files (--redis-ca, --redis-cert, --redis-key) need a rediss:// URL, "
                                      f"not {redact_url(settings.url)}")
        return {}
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise BrokerSettingsError("a client certificate needs its key: give both --redis-cert and --redis-key")
    for path in files.values():
        if not os.path.isfile(path):
            raise BrokerSettingsError(f"TLS file not found: {path}")
    return {"ssl_cert_reqs": "required", **files}


def _options(settings: RedisSettings) -> tuple[dict, list[tuple[str, int]], dict]:
    """Connection options shared by the blocking and the asyncio clients, the sentinels (if any), and the
    options for connections to the sentinels themselves."""
    common: dict = {
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.socket_timeout_s,
        "health_check_interval": 30,
        "decode_responses": False,
    }
    if settings.username:
        common["username"] = settings.username
    if settings.password:
        common["password"] = settings.password
    tls = _tls_options(settings)
    common.update(tls)
    hosts = []
    sentinel_kwargs: dict = {}
    if settings.sentinels:
        # The master's database comes from the URL (the sentinels know nothing of it).
        common["db"] = int(parse_url(settings.url).get("db", 0))
        for part in settings.sentinels.split(","):
            host, _, port = part.strip().rpartition(":")
            hosts.append((host, int(port)))
        # The sentinels get the socket timeouts and TLS, not the master's credentials (redis-py's default).
        sentinel_kwargs = {k: v for k, v in common.items() if k.startswith("socket_")}
        if tls:
            common["ssl"] = True  # the sentinel pool picks its TLS connection class from this
            sentinel_kwargs.update(ssl=True, **tls)
    return common, hosts, sentinel_kwargs


def redact_url(url: str) -> str:
    """``url`` with its password (``user:password@`` or ``?password=``) shown as ``***``: URLs end up in logs and
    in ``cosine status``, passwords must not."""
    parts = urlsplit(url)
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if netloc == parts.netloc and all(k != "password" for k, _ in pairs):
        return url
    query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe="*")
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def explain_connection_error(exc: Exception, first: bool = True) -> str:
    """A connection error with what usually causes it when the cause is TLS: certificates, or (``first``: no
    connection has worked yet, so a server that went away is unlikely) a plain connection to a TLS port."""
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return (f"{text} (the server's certificate is not signed by a CA this client trusts: give the CA with "
                "--redis-ca / $COSINE_REDIS_CA)")
    if "CERTIFICATE_REQUIRED" in text or "EOF occurred in violation of protocol" in text:
        return f"{text} (the server asks for a client certificate: give --redis-cert and --redis-key)"
    mismatch = ("Connection reset by peer", "Connection closed by server", "WRONG_VERSION_NUMBER")
    if first and any(s in text for s in mismatch):
        return (f"{text} (a plain redis:// connection to a port that speaks TLS, or the reverse? A TLS port needs "
                "rediss:// and the CA with --redis-ca; one that asks for client certificates, --redis-cert and "
                "--redis-key too)")
    return text


def connect(settings: RedisSettings) -> redis.Redis:
    """A client whose socket timeout exceeds every blocking read we issue."""
    common, sentinels, sentinel_kwargs = _options(settings)
    if sentinels:
        from redis.sentinel import Sentinel

        return Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs, **common).master_for(settings.sentinel_master)
    if settings.cluster:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(settings.url, **common)
    return redis.Redis.from_url(settings.url, **common)


def connect_async(settings: RedisSettings) -> aioredis.Redis:
    """The asyncio client for the same settings as :func:`connect`."""
    common, sentinels, sentinel_kwargs = _options(settings)
    if sentinels:
        from redis.asyncio.sentinel import Sentinel

        return Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs, **common).master_for(settings.sentinel_master)
    if settings.cluster:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(settings.url, **common)
    return aioredis.Redis.from_url(settings.url, **common)
