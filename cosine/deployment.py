"""A whole deployment on one machine: a private Redis (unless a URL is given), worker processes and
optionally a controller (``WorkerSpec("controller", ...)``).

Used by ``cosine up``, ``cosine demo``, the end-to-end benchmark and the tests. Workers are separate
processes (``cosine worker ...``) that talk to each other only through Redis. A worker given ``cpus`` runs
pinned to those cores from its first instruction (the benchmarks' node-emulated view); ``redis_cpus`` pins
the private Redis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import redis

from cosine import defaults
from cosine.bench.pinning import pin_threads, pinned_command
from cosine.broker import RedisSettings, Streams, connect
from cosine.errors import CosineError
from cosine.keys import Keys
from cosine.local_redis import LocalRedis

log = logging.getLogger(__name__)


class DeploymentError(CosineError):
    """A worker did not come up."""


@dataclass
class WorkerSpec:
    role: str  # "verifier", "drafter", "controller" or "dashboard" (args: its --port)
    name: str
    args: list[str] = field(default_factory=list)  # extra `cosine worker <role>` (`cosine controller`) flags
    threads: int = 1
    env: dict[str, str] = field(default_factory=dict)
    cpus: frozenset[int] | None = None  # cores the process is pinned to (None: wherever the OS puts it)


class Deployment:
    def __init__(self, workers: list[WorkerSpec], redis_url: str | None = None, prefix: str = defaults.KEY_PREFIX,
                 appendonly: bool = False, log_dir: str | None = None, device: str | None = None,
                 dtype: str | None = None, zoo: str | None = None, redis_cpus: frozenset[int] | None = None,
                 broker: RedisSettings | None = None) -> None:
        """``broker``: an existing broker's settings (its URL, unless ``redis_url`` is given, and its Sentinel and
        TLS options, which every worker's command line carries; not its credentials: give a worker's password in
        ``WorkerSpec.env``)."""
        self.specs = workers
        self.broker = broker or RedisSettings()
        redis_url = redis_url or (broker.url if broker else None)
        self.redis_cpus = redis_cpus
        self.prefix = prefix
        self.local = None if redis_url else LocalRedis(appendonly=appendonly)
        self._url = redis_url
        self.role_urls: dict[str, str] = {}  # a role's own broker URL (its ACL user), else ``url``: url_for
        self.log_dir = log_dir
        self.device, self.dtype, self.zoo = device, dtype, zoo
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, object] = {}

    @property
    def url(self) -> str:
        return self._url or self.local.url  # type: ignore[union-attr]

    def url_for(self, role: str) -> str:
        """The URL a role connects with (``role_urls``, else ``url``); this process reads as "monitor"
        (``wait_ready``). A worker's URL is on its command line, so it should carry a user but no password
        (give that in ``WorkerSpec.env`` as ``COSINE_REDIS_PASSWORD``)."""
        return self.role_urls.get(role, self.url)

    def redis_settings(self, role: str | None = None) -> RedisSettings:
        """Settings to reach the broker (as ``role``'s user, if given), with the deployment's Sentinel and TLS
        options."""
        return dataclasses.replace(self.broker, url=self.url_for(role) if role else self.url, prefix=self.prefix)

    def start(self, ready_timeout: float = 120.0) -> Deployment:
        if self.local is not None:
            self.local.start()
            if self.redis_cpus:
                pin_threads(self.local.proc.pid, self.redis_cpus)  # type: ignore[union-attr]
        for spec in self.specs:
            self.start_worker(spec)
        self.wait_ready([s.name for s in self.specs if s.role != "dashboard"], ready_timeout)
        for spec in self.specs:
            if spec.role == "dashboard":
                self.wait_listening(spec.name, self.dashboard_port(spec), ready_timeout)
        return self

    @staticmethod
    def dashboard_port(spec: WorkerSpec) -> int:
        return int(spec.args[spec.args.index("--port") + 1])

    def command(self, spec: WorkerSpec) -> list[str]:
        url = self.url_for(spec.role)
        if spec.role in ("controller", "dashboard"):  # no models: only the broker options and their own
            name = ["--name", spec.name] if spec.role == "controller" else []
            return [sys.executable, "-m", "cosine.cli", spec.role, "--redis-url", url, "--prefix",
                    self.prefix, *self.broker.command_line(), *name] + spec.args
        cmd = [sys.executable, "-m", "cosine.cli", "worker", spec.role, "--redis-url", url,
               "--prefix", self.prefix, *self.broker.command_line(), "--name", spec.name,
               "--threads", str(spec.threads)]
        if self.device:
            cmd += ["--device", self.device]
        if self.dtype:
            cmd += ["--dtype", self.dtype]
        if self.zoo:
            cmd += ["--zoo", self.zoo]
        return cmd + spec.args

    def start_worker(self, spec: WorkerSpec) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec.env}
        out = subprocess.DEVNULL
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            out = open(os.path.join(self.log_dir, f"{spec.name}.log"), "ab")  # noqa: SIM115
            self._logs[spec.name] = out
        cmd = pinned_command(self.command(spec), spec.cpus) if spec.cpus else self.command(spec)
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs[spec.name] = proc
        return proc

    def wait_ready(self, names: list[str], timeout: float = 120.0) -> None:
        """Wait until every named worker has a heartbeat (its models are loaded and its loop runs)."""
        settings = self.redis_settings("monitor")
        streams = Streams(connect(settings), Keys(settings.prefix))
        deadline = time.monotonic() + timeout
        while True:
            try:
                live = streams.live_workers()
            except redis.RedisError:
                live = {}
            missing = [n for n in names if n not in live]
            if not missing:
                return
            dead = [n for n in missing if self.procs.get(n) is not None and self.procs[n].poll() is not None]
            if dead or time.monotonic() > deadline:
                raise DeploymentError(f"workers did not come up: {dead or missing} (see their logs)")
            time.sleep(0.1)

    def wait_listening(self, name: str, port: int, timeout: float) -> None:
        """Wait until the process ``name`` accepts connections on 127.0.0.1:``port``."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                raise DeploymentError(f"{name} did not start listening on port {port} (see its log)")
            time.sleep(0.1)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.wait()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every worker (they finish their step and deregister), then stop Redis."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for f in self._logs.values():
            f.close()  # type: ignore[attr-defined]
        if self.local is not None:
            self.local.close()

    def __enter__(self) -> Deployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
