"""The producer clients connect as the settings say: credentials and key prefix for the asyncio client too,
and the URL's database when a Sentinel names the master."""

from __future__ import annotations

import asyncio

import pytest
import redis

from cosine.broker import RedisSettings, connect, connect_async
from cosine.client import AsyncClient, Client
from cosine.errors import OverloadedError
from cosine.local_redis import LocalRedis


def test_with_sentinels_the_urls_database_is_kept():
    settings = RedisSettings(url="redis://127.0.0.1:1/3", sentinels="127.0.0.1:2,127.0.0.1:3")
    assert connect(settings).connection_pool.connection_kwargs["db"] == 3  # built without connecting
    assert connect_async(settings).connection_pool.connection_kwargs["db"] == 3


def test_the_asyncio_client_uses_the_settings_credentials_and_prefix():
    with LocalRedis() as srv:
        admin = redis.Redis.from_url(srv.url)
        admin.execute_command("ACL", "SETUSER", "producer", "on", ">s3cret", "~*", "&*", "+@all")
        admin.execute_command("ACL", "SETUSER", "default", "off")
        settings = RedisSettings(url=srv.url, prefix="tenant", username="producer", password="s3cret")

        async def submit(client: AsyncClient) -> str:
            async with client:
                return await client.submit([5, 6, 7], max_new_tokens=4)

        rid = asyncio.run(submit(AsyncClient(settings=settings, require_workers=False)))
        check = connect(settings)
        [(_, fields)] = check.xrange("tenant:requests")
        assert rid.encode() in b"".join(fields.values()), "the request went to the settings' prefix"
        with pytest.raises(redis.AuthenticationError):  # the default user is off: credentials were needed
            asyncio.run(submit(AsyncClient(srv.url, require_workers=False)))
        check.execute_command("ACL", "SETUSER", "default", "on")  # for the server's own clean shutdown


def test_a_submit_past_the_deployments_limit_is_refused_with_overloaded():
    """Requests queued or in flight are the request stream's length; past the limit a submit raises
    OverloadedError (both clients) instead of queueing what the stream's cap could later trim unseen."""
    with LocalRedis() as srv:
        with Client(srv.url, require_workers=False, max_outstanding=2) as c:
            ids = [c.submit([5, 6], max_new_tokens=2, priority=1) for _ in range(2)]
            with pytest.raises(OverloadedError, match="limit 2"):
                c.submit([5, 6], max_new_tokens=2, priority=1)

            async def one_more() -> str:
                async with AsyncClient(srv.url, require_workers=False, max_outstanding=2) as ac:
                    return await ac.submit([5, 6], max_new_tokens=2, priority=1)

            with pytest.raises(OverloadedError):
                asyncio.run(one_more())
            c.r.xdel(c.keys.requests, c.r.xrange(c.keys.requests)[0][0])  # a request ended: room again
            assert c.submit([5, 6], max_new_tokens=2, priority=1) not in ids


def test_the_last_tenth_of_the_bound_is_kept_for_priority_requests():
    with LocalRedis() as srv, Client(srv.url, require_workers=False, max_outstanding=10) as c:
        for _ in range(9):
            c.submit([5, 6], max_new_tokens=2)
        with pytest.raises(OverloadedError, match="limit 9 at priority 0"):
            c.submit([5, 6], max_new_tokens=2)
        c.submit([5, 6], max_new_tokens=2, priority=2)
        with pytest.raises(OverloadedError, match="limit 10 at priority 2"):
            c.submit([5, 6], max_new_tokens=2, priority=2)


def test_a_deadline_holds_when_the_clients_clock_is_behind(monkeypatch):
    """A client whose host clock is 30 s behind asks for 10 s: the deadline is stamped on the broker's clock,
    so the verifier (right clock) serves the request instead of timing it out at once."""
    import cosine.broker as broker
    import cosine.client as client_module
    from cosine.protocol import Chunk, decode_entry
    from cosine.service.verifier_service import VerifierService, VerifierSettings
    from cosine.sim.engines import SimModel, SimTarget, SimTokenizer

    with LocalRedis() as srv:
        settings = RedisSettings(url=srv.url, prefix="skew")
        svc = VerifierService(settings, VerifierSettings("v0"), SimTarget(SimModel(), time_scale=0), SimTokenizer())
        svc.recover_own()
        real = broker.now_ms
        with monkeypatch.context() as m:  # the client's host
            m.setattr(broker, "now_ms", lambda: real() - 30_000)
            m.setattr(client_module, "now_ms", lambda: real() - 30_000, raising=False)
            with Client(settings=settings, require_workers=False) as c:
                rid = c.submit([16, 17, 18, 19], max_new_tokens=4, timeout=10)
        svc.streams.heartbeat("v0", {"role": "verifier"})  # the verifier's host reads the broker's clock
        chunks: list[Chunk] = []
        for _ in range(200):
            svc.step()
            chunks = [decode_entry(f, (Chunk,)) for _, f in svc.streams.entries(c.output_key(rid))]
            if chunks and chunks[-1].finished:
                break
        assert chunks and chunks[-1].finished and chunks[-1].finish_reason != "timeout", chunks[-1:]


def test_tls_settings_reach_redis_py_for_urls_and_sentinels(tmp_path):
    from redis.sentinel import SentinelManagedSSLConnection

    from cosine.broker import BrokerSettingsError

    ca = tmp_path / "ca.crt"
    ca.write_text("not read before connecting")
    direct = connect(RedisSettings(url="rediss://127.0.0.1:1/0", tls_ca=str(ca)))
    assert direct.connection_pool.connection_kwargs["ssl_ca_certs"] == str(ca)
    assert connect_async(RedisSettings(url="rediss://127.0.0.1:1/0", tls_ca=str(ca))).connection_pool \
        .connection_kwargs["ssl_ca_certs"] == str(ca)
    # Through Sentinel a TLS file turns TLS on for the master and the sentinels alike.
    via = connect(RedisSettings(url="redis://x/2", sentinels="127.0.0.1:2", tls_ca=str(ca)))
    pool = via.connection_pool
    assert pool.connection_class is SentinelManagedSSLConnection and pool.connection_kwargs["db"] == 2
    sentinel = pool.sentinel_manager
    assert sentinel.sentinel_kwargs["ssl"] is True and sentinel.sentinel_kwargs["ssl_ca_certs"] == str(ca)
    assert "password" not in sentinel.sentinel_kwargs
    with pytest.raises(BrokerSettingsError, match="rediss://"):
        connect(RedisSettings(url="redis://127.0.0.1:1/0", tls_ca=str(ca)))
    with pytest.raises(BrokerSettingsError, match="not found"):
        connect(RedisSettings(url="rediss://127.0.0.1:1/0", tls_ca=str(tmp_path / "missing.crt")))
    shown = RedisSettings(url="rediss://u:pw@127.0.0.1:1/0", tls_ca=str(ca)).describe()
    assert "pw" not in shown and "over TLS" in shown and str(ca) in shown
