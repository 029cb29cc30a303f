"""Failover through Redis Sentinel, for real: a master, a replica (``--replicaof``) and a sentinel process, and a
deployment (verifier and drafter processes) that finds the master through the sentinel. A request completes;
the master is killed (SIGKILL); once the sentinel has promoted the replica, the workers and the client find the
new master through the sentinel and a new request completes exactly. Requests in flight across the failover
either complete exactly or end with a typed error: none is silently lost. (Replication is asynchronous: what the
old master took in its last moments may be missing on the new one; docs/guarantees.md.)"""

from __future__ import annotations

import time

import pytest
import redis

from cosine.broker import RedisSettings, connect
from cosine.client import Client
from cosine.deployment import Deployment, WorkerSpec
from cosine.errors import CosineError
from cosine.local_redis import LocalRedis, find_redis_server
from cosine.sampling_params import SamplingParams

from .helpers import greedy_divergences
from .pipeline_helpers import wait_for

pytestmark = pytest.mark.slow

MASTER = "mymaster"


class Replica(LocalRedis):
    def __init__(self, master_port: int) -> None:
        super().__init__()
        self.master_port = master_port

    def server_args(self) -> list[str]:
        return super().server_args() + ["--replicaof", "127.0.0.1", str(self.master_port)]


class SentinelProcess(LocalRedis):
    """``redis-server sentinel.conf --sentinel`` watching the master with a quorum of 1 and a 1 s down-after."""

    def __init__(self, master_port: int) -> None:
        super().__init__()
        self.master_port = master_port

    def server_args(self) -> list[str]:
        conf = self.dir / "sentinel.conf"  # the sentinel rewrites it: a file of its own, in its own folder
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\nlogfile {self.dir / 'redis.log'}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 10000\n"
            f"sentinel parallel-syncs {MASTER} 1\n")
        return [find_redis_server(), str(conf), "--sentinel"]

    def master_port_now(self) -> int:
        _host, port = self.admin_client().sentinel_get_master_addr_by_name(MASTER)
        return int(port)

    def stop(self, timeout: float = 10.0) -> None:  # a sentinel has no SHUTDOWN NOSAVE: terminate it
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout)


@pytest.fixture(scope="module")
def topology():
    master = LocalRedis().start()
    replica = Replica(master.port).start()
    sentinel = None
    try:
        r = redis.Redis(port=replica.port)
        wait_for(lambda: r.info("replication").get("master_link_status") == "up", 20, what="the replica's sync")
        sentinel = SentinelProcess(master.port).start()
        s = sentinel.admin_client()

        def knows_replica():
            return any(not row["is_disconnected"] for row in s.sentinel_slaves(MASTER))

        wait_for(knows_replica, 20, what="the sentinel to find the replica")
        yield master, replica, sentinel
    finally:
        for srv in (sentinel, replica, master):
            if srv is not None:
                srv.close()


def broker(sentinel: SentinelProcess) -> RedisSettings:
    return RedisSettings(url="redis://sentinel-decides/0", sentinels=f"127.0.0.1:{sentinel.port}",
                         sentinel_master=MASTER)


@pytest.fixture(scope="module")
def cluster(topology, tmp_path_factory):
    _master, _replica, sentinel = topology
    specs = [WorkerSpec("verifier", "verifier-0"), WorkerSpec("drafter", "drafter-0")]
    dep = Deployment(specs, broker=broker(sentinel), log_dir=str(tmp_path_factory.mktemp("logs")), device="cpu",
                     dtype="float32")
    with dep:
        yield dep


def check_exact(zoo_engine, prompts, results, max_new):
    ids = [zoo_engine.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    refs = [zoo_engine.generate([p], SamplingParams(max_new_tokens=max_new), speculative=False)[0].output_ids
            for p in ids]
    _ties, failures = greedy_divergences(zoo_engine.verifier.runner.model, ids, [r.token_ids for r in results], refs)
    assert not failures, failures


def test_workers_follow_a_failover_through_sentinel(topology, cluster, zoo_engine, zoo_prompts):
    master, replica, sentinel = topology
    for spec in cluster.specs:  # the workers find the master through the sentinel
        cmd = cluster.command(spec)
        assert cmd[cmd.index("--sentinels") + 1] == f"127.0.0.1:{sentinel.port}"
    prompts = [zoo_prompts[d][1] for d in sorted(zoo_prompts)]
    with Client(settings=broker(sentinel)) as client:
        first = client.generate(prompts[0], max_new_tokens=16, timeout=60)
        check_exact(zoo_engine, prompts[:1], [first], 16)
        assert first.stats["drafts"] >= 1

        # Requests in flight when the master dies.
        inflight = [client.submit(p, max_new_tokens=32, timeout=40) for p in prompts]
        time.sleep(0.3)
        master.kill()
        t0 = time.monotonic()
        wait_for(lambda: sentinel.master_port_now() == replica.port, 30, interval=0.2, what="the failover")
        check = connect(broker(sentinel))

        def new_master_serves():  # the sentinel vouches for it once it has seen it report as a master
            try:
                return check.info("replication")["role"] == "master"
            except redis.ConnectionError:  # MasterNotFoundError meanwhile
                return False

        wait_for(new_master_serves, 30, interval=0.2, what="the new master")
        failover_s = time.monotonic() - t0

        outcomes = []
        for rid in inflight:
            try:
                outcomes.append(client.result(rid, timeout=40))
            except CosineError as exc:  # an explicit end (lost with the old master: a timeout), never silence
                outcomes.append(exc)
        done = [(p, r) for p, r in zip(prompts, outcomes) if not isinstance(r, Exception)]
        if done:
            check_exact(zoo_engine, [p for p, _ in done], [r for _, r in done], 32)

        # After the failover: workers reconnected through the sentinel and serve new requests exactly.
        after = client.generate(prompts[1], max_new_tokens=24, timeout=60)
        check_exact(zoo_engine, prompts[1:2], [after], 24)
        assert after.stats["verifier"] == "verifier-0"
    print(f"\nfailover took {failover_s:.1f} s; in flight: {len(done)} completed, "
          f"{[type(o).__name__ for o in outcomes if isinstance(o, Exception)]} ended with errors")
    assert all(proc.poll() is None for proc in cluster.procs.values()), "the workers lived through it"
