"""A verifier worker with a KV budget (``--kv-memory``), on a real Redis with worker processes: a request that
could never fit is refused with a typed error, requests whose reservations together exceed the budget all
complete (they wait for room, they are not refused) with the target's own tokens, and the heartbeat and
``cosine status`` report the cache's memory."""

from __future__ import annotations

import pytest

from cosine.broker import RedisSettings
from cosine.client import Client
from cosine.engine.kv_budget import bytes_per_token
from cosine.errors import InvalidRequestError
from cosine.local_redis import LocalRedis
from cosine.status import collect_status, format_status

from .helpers import greedy_divergences
from .pipeline_helpers import deployment, heartbeat_until
from .test_pipeline import reference

pytestmark = pytest.mark.slow

MAX_NEW = 24


def test_a_verifier_with_a_kv_budget_refuses_what_never_fits_and_queues_the_rest(zoo_engine, zoo_prompts, tmp_path):
    texts = [zoo_prompts[domain][i] for i in range(3) for domain in sorted(zoo_prompts)][:6]
    prompts = [zoo_engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    longest = max(len(p) for p in prompts) + MAX_NEW
    capacity = 2 * longest + 8  # room for two requests at a time: six together are three times too many
    assert sum(len(p) + MAX_NEW for p in prompts) > capacity
    model = zoo_engine.verifier.runner.model
    budget = capacity * bytes_per_token(model.config, model.dtype)
    with LocalRedis() as redis_server, deployment(redis_server.url, verifier_args=["--kv-memory", str(budget)],
                                                  log_dir=str(tmp_path)) as dep, Client(dep.url) as client:
        with pytest.raises(InvalidRequestError) as err:  # prompt + max_new_tokens > the whole budget
            client.generate(texts[0], max_new_tokens=capacity, timeout=120)
        assert err.value.field == "max_new_tokens" and f"holds {capacity}" in str(err.value)
        ids = [client.submit(t, max_new_tokens=MAX_NEW, timeout=300) for t in texts]
        results = [client.result(rid, timeout=300) for rid in ids]
        info = heartbeat_until(dep.url, "verifier", "verifier-0", lambda i: int(i.get("completed", 0)) >= len(ids))
        status = format_status(collect_status(RedisSettings(url=dep.url)))
    _, refs = reference(zoo_engine, texts, [MAX_NEW] * len(texts))
    ties, failures = greedy_divergences(model, prompts, [r.token_ids for r in results], refs)
    assert not failures and len(ties) <= 1, (ties, failures)
    assert int(info["kv_capacity_tokens"]) == capacity
    assert 0 < int(info["kv_peak_bytes"]) <= budget
    assert int(info["rss_peak_bytes"]) > 0 and int(info["rejected"]) >= 1
    assert int(info["kv_waits"]) >= 1, "requests beyond the budget waited for room"
    assert f"{capacity} slots" in status and "kv peak" in status
