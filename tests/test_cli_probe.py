"""``cosine worker-ready``: the readiness probe the Kubernetes manifests and compose file run in each worker's
container, under that worker's own ACL user (broker_config/users.acl)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from click.testing import CliRunner

from cosine.broker import Streams
from cosine.broker_config import BrokerConfig, ConfiguredRedis
from cosine.cli import cli
from cosine.keys import Keys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _probe(srv: ConfiguredRedis, role: str, *args: str, env: dict | None = None):
    return CliRunner().invoke(cli, ["worker-ready", "--redis-url", srv.url_for(role), *args],
                              env={"COSINE_REDIS_PASSWORD": srv.config.password(role), **(env or {})})


def test_worker_ready_exits_0_for_a_fresh_worker_and_1_otherwise():
    with ConfiguredRedis(BrokerConfig(ROOT / "broker_config")) as srv:
        admin = Streams(srv.admin_client(), Keys("cosine"))
        for role in ("verifier", "drafter"):  # nothing registered yet: not ready
            assert _probe(srv, role, "--name", "verifier-0").exit_code == 1
        admin.heartbeat("verifier-0", {"role": "verifier"})
        admin.heartbeat("drafter-0", {"role": "drafter"})

        # The verifier's user reads the registry: the heartbeat's age decides.
        ok = _probe(srv, "verifier", "--name", "verifier-0", "--role", "verifier")
        assert ok.exit_code == 0, ok.output
        assert "heartbeat under 3 s" in ok.output
        assert _probe(srv, "verifier", "--name", "verifier-0", "--role", "drafter").exit_code == 1
        # The name from the environment, as the manifests give it (the downward API's pod name).
        assert _probe(srv, "verifier", "--role", "verifier", env={"COSINE_WORKER_READY_NAME": "verifier-0"}
                      ).exit_code == 0
        # A stale heartbeat (a worker that died without deregistering): registered, not ready.
        admin.r.zadd(admin.keys.workers, {"verifier-0": admin.server_ms() - 10_000})
        stale = _probe(srv, "verifier", "--name", "verifier-0")
        assert stale.exit_code == 1 and "older than 3 s" in stale.output

        # The drafter's user may not read the registry: registered (the hash lives 12 s past the last beat).
        dr = _probe(srv, "drafter", "--name", "drafter-0", "--role", "drafter")
        assert dr.exit_code == 0, dr.output
        admin.forget_worker("drafter-0")
        assert _probe(srv, "drafter", "--name", "drafter-0").exit_code == 1

        # A wrong password: Redis cannot be read, not ready.
        bad = CliRunner().invoke(cli, ["worker-ready", "--redis-url", srv.url_for("verifier"), "--name",
                                       "verifier-0"], env={"COSINE_REDIS_PASSWORD": "wrong"})
        assert bad.exit_code == 1 and "cannot read Redis" in bad.output


def test_worker_ready_exit_status_reaches_the_shell():
    """Through ``cosine``'s own entry point (click runs without standalone mode there)."""
    with ConfiguredRedis(BrokerConfig(ROOT / "broker_config")) as srv:
        Streams(srv.admin_client(), Keys("cosine")).heartbeat("verifier-0", {"role": "verifier"})
        env = {**os.environ, "COSINE_REDIS_URL": srv.url_for("controller"),
               "COSINE_REDIS_PASSWORD": srv.config.password("controller")}
        cmd = [sys.executable, "-c", "from cosine.cli import main; main()", "worker-ready", "-q"]
        assert subprocess.run([*cmd, "--name", "verifier-0"], env=env, timeout=60).returncode == 0
        assert subprocess.run([*cmd, "--name", "verifier-9"], env=env, timeout=60).returncode == 1
