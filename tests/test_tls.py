"""Redis over TLS, for real: a throwaway CA signs a server and a client certificate (``openssl``), redis-server
listens only on a TLS port, and a deployment (verifier and drafter processes) serves over ``rediss://`` with the
CA, the client certificate and a password read from a file, output equal to the target alone's. ``cosine
status`` works over TLS and shows no password; a plain connection, a client without the CA and one without a
certificate are refused with errors that say why."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from cosine.broker import BrokerSettingsError, RedisSettings, connect, connect_async, explain_connection_error
from cosine.cli import cli
from cosine.client import AsyncClient, Client
from cosine.deployment import Deployment, WorkerSpec
from cosine.local_redis import LocalRedis
from cosine.sampling_params import SamplingParams

from .helpers import greedy_divergences

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make certificates")]

PASSWORD = "tls-s3cret-7f1d"


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 / localhost and a client certificate, all signed by the CA."""
    d = tmp_path_factory.mktemp("tls")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=cosine test CA",
            "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", str(d / "server.ext")]), ("client", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=cosine {name}", "-keyout",
                str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
        openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"), "-CAkey",
                str(d / "ca.key"), "-CAcreateserial", "-days", "2", "-out", str(d / f"{name}.crt"), *ext)
    (d / "password").write_text(PASSWORD + "\n")
    return {name: str(d / name) for name in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key",
                                             "password")}


class TLSRedis(LocalRedis):
    """A private redis-server that listens only on a TLS port (``--port 0``), optionally asking clients for a
    certificate signed by the CA and for a password."""

    def __init__(self, certs: dict[str, str], auth_clients: bool, password: str | None = None) -> None:
        super().__init__()
        self.certs, self.auth_clients, self.password = certs, auth_clients, password

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def server_args(self) -> list[str]:
        args = super().server_args()
        args[args.index("--port") + 1] = "0"
        args += ["--tls-port", str(self.port), "--tls-cert-file", self.certs["server.crt"], "--tls-key-file",
                 self.certs["server.key"], "--tls-ca-cert-file", self.certs["ca.crt"], "--tls-auth-clients",
                 "yes" if self.auth_clients else "no"]
        return args + (["--requirepass", self.password] if self.password else [])

    def admin_client(self, **kwargs) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, ssl=True, ssl_ca_certs=self.certs["ca.crt"],
                           ssl_certfile=self.certs["client.crt"], ssl_keyfile=self.certs["client.key"],
                           password=self.password, **kwargs)


@pytest.fixture(scope="module")
def server(certs):
    with TLSRedis(certs, auth_clients=True, password=PASSWORD) as srv:
        yield srv


def settings_for(server, certs, **over) -> RedisSettings:
    fields = dict(url=server.url, password=PASSWORD, tls_ca=certs["ca.crt"], tls_cert=certs["client.crt"],
                  tls_key=certs["client.key"])
    return RedisSettings(**{**fields, **over})


@pytest.fixture(scope="module")
def cluster(server, certs, tmp_path_factory):
    """A verifier and a drafter over TLS; their password comes from a file named in their environment."""
    env = {"COSINE_REDIS_PASSWORD_FILE": certs["password"]}
    specs = [WorkerSpec("verifier", "verifier-0", env=env), WorkerSpec("drafter", "drafter-0", env=env)]
    dep = Deployment(specs, broker=settings_for(server, certs), log_dir=str(tmp_path_factory.mktemp("logs")),
                     device="cpu", dtype="float32")
    with dep:
        yield dep


def test_worker_command_lines_carry_the_tls_files_and_no_password(cluster, certs):
    for spec in cluster.specs:
        cmd = cluster.command(spec)
        assert cmd[cmd.index("--redis-url") + 1].startswith("rediss://127.0.0.1:")
        for flag, name in (("--redis-ca", "ca.crt"), ("--redis-cert", "client.crt"), ("--redis-key", "client.key")):
            assert cmd[cmd.index(flag) + 1] == certs[name]
        assert PASSWORD not in " ".join(cmd)


def test_a_deployment_serves_over_tls_exactly(cluster, server, certs, zoo_engine, zoo_prompts):
    prompts = [zoo_prompts[d][0] for d in sorted(zoo_prompts)][:3]
    with Client(settings=settings_for(server, certs)) as client:
        ids = [client.submit(p, max_new_tokens=24) for p in prompts]
        results = [client.result(rid, timeout=120) for rid in ids]

    async def one() -> object:
        async with AsyncClient(settings=settings_for(server, certs)) as aclient:
            return await aclient.generate(prompts[0], max_new_tokens=24, timeout=120)

    results.append(asyncio.run(one()))
    prompts.append(prompts[0])
    ids = [zoo_engine.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    refs = []
    for p in ids:
        [s] = zoo_engine.generate([p], SamplingParams(max_new_tokens=24), speculative=False)
        refs.append(s.output_ids)
    ties, failures = greedy_divergences(zoo_engine.verifier.runner.model, ids, [r.token_ids for r in results], refs)
    assert not failures, failures
    assert sum(r.stats["drafts"] for r in results) >= len(results), "the drafter took part over TLS"
    assert all(r.stats["verifier"] == "verifier-0" for r in results)


def test_cosine_status_over_tls_shows_no_password(cluster, server, certs):
    args = ["status", "--redis-url", server.url, "--redis-ca", certs["ca.crt"], "--redis-cert", certs["client.crt"],
            "--redis-key", certs["client.key"], "--password-file", certs["password"]]
    out = CliRunner().invoke(cli, args + ["--json"])
    assert out.exit_code == 0, out.output
    snap = json.loads(out.output)
    assert {w["id"] for w in snap["workers"] if w["alive"]} >= {"verifier-0", "drafter-0"}
    assert "over TLS" in snap["redis"] and certs["ca.crt"] in snap["redis"]
    text = CliRunner().invoke(cli, args).output
    assert "over TLS" in text and PASSWORD not in text and PASSWORD not in out.output
    for log in Path(cluster.log_dir).glob("*.log"):  # nor do the workers' logs
        assert PASSWORD not in log.read_text()
    # Given both ways, the password is refused as ambiguous.
    both = CliRunner().invoke(cli, args + ["--password", PASSWORD])
    assert both.exit_code != 0 and "once" in both.output


def cosine_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cosine.cli", *args], capture_output=True, text=True, timeout=60)


def test_connections_without_tls_the_ca_or_a_certificate_are_refused_clearly(server, certs):
    plain = server.url.replace("rediss://", "redis://")
    with pytest.raises(redis.ConnectionError):
        connect(RedisSettings(url=plain, password=PASSWORD)).ping()
    done = cosine_cli("status", "--redis-url", plain)  # the command line says what is likely wrong
    assert done.returncode == 2 and "cannot reach Redis" in done.stderr and "rediss://" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr

    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):  # no CA: the system's refuse
        connect(settings_for(server, certs, tls_ca=None)).ping()
    done = cosine_cli("status", "--redis-url", server.url)
    assert done.returncode == 2 and "certificate verify failed" in done.stderr and "--redis-ca" in done.stderr

    with pytest.raises(redis.ConnectionError) as refused:  # the server asks for a client certificate
        connect(settings_for(server, certs, tls_cert=None, tls_key=None)).ping()
    assert "--redis-cert" in explain_connection_error(refused.value)

    async def ping(settings):
        r = connect_async(settings)
        try:
            return await r.ping()
        finally:
            await r.aclose()

    assert asyncio.run(ping(settings_for(server, certs)))
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        asyncio.run(ping(settings_for(server, certs, tls_ca=None)))

    with pytest.raises(BrokerSettingsError, match="rediss://"):  # TLS files with a plain URL: a mistake
        connect(settings_for(server, certs, url=plain))
    with pytest.raises(BrokerSettingsError, match="--redis-key"):
        connect(settings_for(server, certs, tls_key=None))


def test_a_server_without_client_certificates_takes_the_ca_alone(certs):
    with TLSRedis(certs, auth_clients=False) as srv:
        assert connect(RedisSettings(url=srv.url, tls_ca=certs["ca.crt"])).ping()
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            connect(RedisSettings(url=srv.url)).ping()
