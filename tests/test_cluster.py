"""A deployment on a real three-master Redis Cluster (redis-server in cluster mode, joined by
``redis-cli --cluster create``): the prefix becomes one hash tag, so every transaction touches one slot; the
pipeline runs end to end through redis-py's cluster client with outputs exactly the target's."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import pytest
import redis

from cosine.broker import RedisSettings, connect
from cosine.client import Client
from cosine.deployment import Deployment, WorkerSpec
from cosine.errors import RequestCancelledError
from cosine.keys import Keys
from cosine.local_redis import find_redis_server, free_port

from .helpers import assert_greedy_exact
from .pipeline_helpers import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory):
    """Three masters on free ports, no replicas, all 16384 slots assigned; yields a node's URL."""
    ports = _cluster_ports(3)
    procs = []
    for port in ports:
        folder = tmp_path_factory.mktemp(f"node{port}")
        procs.append(subprocess.Popen(
            [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", str(folder / "nodes.conf"), "--dir", str(folder), "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
    try:
        for port in ports:
            wait_for(lambda p=port: _pings(p), 10, what=f"node {port}")
        cli = shutil.which("redis-cli")
        assert cli, "redis-cli is needed to create the cluster"
        subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports], "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=30)
        wait_for(lambda: all(b"cluster_state:ok" in redis.Redis(port=p).execute_command("CLUSTER", "INFO")
                             for p in ports), 20, 0.2, what="the cluster to agree")
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _cluster_ports(n: int) -> list[int]:
    """Free ports whose cluster-bus ports (port + 10000) are free too, hence below 55536."""
    out: list[int] = []
    while len(out) < n:
        port = free_port()
        if port < 55536 and port not in out and _free(port + 10000):
            out.append(port)
    return out


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pings(port: int) -> bool:
    try:
        return redis.Redis(port=port).ping()
    except redis.ConnectionError:
        return False


@pytest.fixture(scope="module")
def deployed(cluster_url, tmp_path_factory, zoo_root):
    broker = RedisSettings(url=cluster_url, cluster=True)
    specs = [WorkerSpec("verifier", "verifier-0"), WorkerSpec("drafter", "drafter-0"),
             WorkerSpec("controller", "controller", ["--interval-ms", "200"])]
    with Deployment(specs, prefix="cosine", broker=broker, log_dir=str(tmp_path_factory.mktemp("cl-logs")),
                    device="cpu", dtype="float32") as dep:
        yield dep


def test_the_pipeline_on_a_cluster_is_exact(deployed, zoo_engine, zoo_prompts, capsys):
    settings = deployed.redis_settings()
    assert settings.prefix == "{cosine}"
    texts = [zoo_prompts[d][i] for i in range(2) for d in sorted(zoo_prompts)]
    with Client(settings=settings) as client:
        results = client.generate_many(texts, max_new_tokens=32, timeout=180)
        long = client.submit(texts[0], max_new_tokens=400, ignore_eos=True)
        wait_for(lambda: client.r.xlen(client.output_key(long)) >= 2, 60, what="first chunks")
        client.cancel(long)
        with pytest.raises(RequestCancelledError):
            client.result(long, timeout=60)
    assert sum(r.stats["drafts"] for r in results) > 0  # the drafter took part
    prompts = [zoo_engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert_greedy_exact(zoo_engine, prompts, [r.token_ids for r in results], capsys, 32)


def test_every_key_is_in_one_slot_and_status_reads_the_cluster(deployed, cluster_url):
    r = connect(deployed.redis_settings())
    keys = Keys("{cosine}")
    wait_for(lambda: r.hget(keys.control, "version") is not None, 20, what="the controller's first decision")
    names = list(r.scan_iter(match="{cosine}:*"))
    assert {k.split(b":")[1] for k in names} >= {b"requests", b"draft", b"verify", b"workers", b"worker", b"control"}
    assert len({r.keyslot(k) for k in names}) == 1
    out = subprocess.run([sys.executable, "-m", "cosine.cli", "status", "--json", "--cluster", "--redis-url",
                          cluster_url], capture_output=True, text=True, check=True, timeout=60)
    snap = json.loads(out.stdout)
    assert snap["prefix"] == "{cosine}"
    assert {w["id"] for w in snap["workers"] if w["alive"]} == {"verifier-0", "drafter-0", "controller"}
    assert any(s["stream"] == "{cosine}:requests" for s in snap["streams"])
