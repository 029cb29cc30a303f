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
