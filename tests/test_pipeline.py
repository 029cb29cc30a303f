"""The distributed pipeline on a real Redis (started by the tests) with workers as separate processes."""

from __future__ import annotations

import asyncio
import json
import time

import msgpack
import pytest

from cosine.client import AsyncClient, Client
from cosine.errors import (
    InvalidParameterError,
    InvalidRequestError,
    NoWorkersError,
    RequestCancelledError,
    RequestTimeoutError,
)
from cosine.local_redis import LocalRedis
from cosine.protocol import SCHEMA_VERSION as V
from cosine.sampling_params import SamplingParams

from .helpers import assert_greedy_exact, greedy_divergences, target_outputs
from .pipeline_helpers import deployment, heartbeat_until, streams, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def redis_server(live_redis):
    return live_redis


@pytest.fixture(scope="module")
def trace_file(live_trace):
    return live_trace


@pytest.fixture(scope="module")
def cluster(live_cluster):
    """The session's shared deployment: one verifier (tracing its passes) and one drafter."""
    return live_cluster


@pytest.fixture(scope="module")
def client(live_client):
    return live_client


def workload(zoo_prompts, per_domain=8):
    items = []
    for i in range(per_domain):
        for domain in sorted(zoo_prompts):
            items.append((zoo_prompts[domain][i], (16, 32, 48)[(i + len(items)) % 3]))
    return items


def reference(zoo_engine, texts, max_new):
    ids = [zoo_engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return ids, target_outputs(zoo_engine, ids, max_new)


def test_concurrent_mixed_requests_match_the_target(client, zoo_engine, zoo_prompts, capsys):
    items = workload(zoo_prompts)
    assert len(items) >= 20
    ids = [client.submit(text, max_new_tokens=n) for text, n in items]
    results = [client.result(rid, timeout=300) for rid in ids]
    prompts = [zoo_engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t, _ in items]
    assert_greedy_exact(zoo_engine, prompts, [r.token_ids for r in results], capsys, [n for _, n in items])
    assert sum(r.stats["drafts"] for r in results) > len(results)
    assert all(r.stats["verifier"] == "verifier-0" for r in results)
    for r in results:
        assert r.text == zoo_engine.tokenizer.decode(r.token_ids)
        assert r.stats["completion_tokens"] == len(r.token_ids)
        assert {"queue_ms", "drafting_ms", "verifying_ms", "tokens_by_drafter",
                "mean_acceptance_length"} <= set(r.stats)


def test_per_request_speculation_and_drafter_choice_keep_the_output(client, zoo_engine, zoo_prompts, capsys):
    """Speculation off, fixed, adaptive; a pinned drafter and a restricted pool: all give the target's output."""
    prompt = zoo_prompts["code"][6]
    runs = {
        "off": client.generate(prompt, max_new_tokens=32, speculation="off"),
        "fixed 2": client.generate(prompt, max_new_tokens=32, speculation=2),
        "adaptive": client.generate(prompt, max_new_tokens=32),
        "pinned prose": client.generate(prompt, max_new_tokens=32, drafter="prose"),
        "only records": client.generate(prompt, max_new_tokens=32, drafters=["records"]),
    }
    prompts, refs = reference(zoo_engine, [prompt], [32])
    for name, r in runs.items():
        ties, failures = greedy_divergences(zoo_engine.verifier.runner.model, prompts, [r.token_ids], refs)
        with capsys.disabled():
            for _i, j, gap in ties:
                print(f"\n[near-tie] {name}: first difference at {j}, top-2 gap {gap:.2e}")
        assert not failures, (name, failures)
    assert runs["off"].stats["drafts"] == 0 and runs["off"].stats["plain_steps"] >= 31
    fixed = runs["fixed 2"].stats
    assert fixed["drafts"] > 0 and fixed["drafted"] <= 2 * fixed["drafts"]
    assert set(runs["pinned prose"].stats["tokens_by_drafter"]) <= {"prose"}
    assert set(runs["only records"].stats["tokens_by_drafter"]) <= {"records"}
    assert runs["adaptive"].stats["prompt_feature"] in ("code", "prose", "records")


def test_routing_and_lookahead_at_work(cluster, client, zoo_prompts):
    """Mixed domains reach different drafters; an idle drafter's lookahead drafts get used."""
    prompts = [zoo_prompts[d][i] for d in sorted(zoo_prompts) for i in (7, 8)]
    results = [client.generate(p, max_new_tokens=32, ignore_eos=True) for p in prompts]
    used = {name for r in results for name in r.stats["tokens_by_drafter"]}
    assert len(used) >= 2, used
    assert sum(r.stats["lookahead_hits"] for r in results) > 0
    info = heartbeat_until(cluster.url, "drafter", "drafter-0", lambda w: int(w["lookahead_hits"]) > 0)
    assert int(info["bets_sent"]) >= int(info["lookahead_hits"]), "every hit is a bet the drafter sent"


def test_pass_trace_accounts_for_the_verifiers_time(cluster, client, zoo_prompts, trace_file):
    """--trace-passes: a line per pass, whose prefill time adds up to the verifier's own counter."""
    client.generate_many([zoo_prompts[d][0] for d in sorted(zoo_prompts)], max_new_tokens=16)
    lines = [json.loads(line) for line in trace_file.read_text().splitlines()]
    assert lines
    for line in lines:
        assert 1 <= line["verified"] == len(line["depths"]) and line["forward_ms"] > 0
        assert line["slots_run"] >= line["slots_fed"] >= line["verified"]
        assert min(line[k] for k in ("admit_ms", "messaging_ms", "blocked_ms", "scheduling_ms")) >= 0
    assert any(d > 0 for line in lines for d in line["depths"])
    traced = sum(line["admit_ms"] for line in lines)
    assert traced > 0
    heartbeat_until(cluster.url, "verifier", "verifier-0", lambda w: traced <= float(w["admit_s"]) * 1000 + 1)


def test_seeded_sampling_is_reproducible(client, zoo_prompts):
    prompts = [zoo_prompts[d][3] for d in sorted(zoo_prompts)]
    kw = dict(max_new_tokens=24, temperature=0.8, top_p=0.95)
    first = [client.generate(p, seed=7 + i, **kw) for i, p in enumerate(prompts)]
    ids = [client.submit(p, seed=7 + i, **kw) for i, p in enumerate(prompts)]  # concurrently this time
    second = [client.result(rid) for rid in ids]
    assert [r.token_ids for r in first] == [r.token_ids for r in second]


def test_stream_yields_what_generate_returns(client, zoo_prompts):
    prompt = zoo_prompts["prose"][4]
    chunks = list(client.stream(prompt, max_new_tokens=32))
    assert chunks[-1].finished and chunks[-1].stats and len(chunks) >= 2
    full = client.generate(prompt, max_new_tokens=32)
    assert "".join(c.text for c in chunks) == full.text
    assert [t for c in chunks for t in c.token_ids] == full.token_ids


def test_async_client(cluster, client, zoo_prompts):
    """The asyncio client gets what the blocking one gets (greedy: the target's own tokens), streamed too."""
    prompts = [zoo_prompts["code"][5], zoo_prompts["records"][5], zoo_prompts["prose"][5]]

    async def go():
        async with AsyncClient(cluster.url) as ac:
            res = await ac.generate_many(prompts[:2], max_new_tokens=16)
            parts = [c async for c in ac.stream(prompts[2], max_new_tokens=16)]
            return res, parts

    res, parts = asyncio.run(go())
    want = [client.generate(p, max_new_tokens=16) for p in prompts]
    assert [r.token_ids for r in res] == [w.token_ids for w in want[:2]]
    assert [r.text for r in res] == [w.text for w in want[:2]]
    assert parts[-1].finished and [t for c in parts for t in c.token_ids] == want[2].token_ids


def test_invalid_parameters_raise_typed_errors(client):
    for kwargs, field in [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
                          ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"), ({"timeout": -1}, "timeout")]:
        with pytest.raises(InvalidParameterError) as err:
            client.generate("hello", **kwargs)
        assert err.value.field == field
    with pytest.raises(InvalidParameterError) as err:
        client.generate("")
    assert err.value.field == "prompt"
    with pytest.raises(InvalidRequestError) as err:  # valid on the wire, too long for the model
        client.generate([5] * 5000, max_new_tokens=4)
    assert err.value.field == "prompt"


def test_malformed_messages_are_dead_lettered_and_workers_keep_serving(cluster, client, zoo_prompts):
    s = streams(cluster.url)
    k = s.keys
    before = s.r.xlen(k.dlq)
    junk = [
        (k.requests, {b"d": b"\xc1\xc1"}),
        (k.requests, {b"d": msgpack.packb({"v": V, "t": "request", "request_id": "bad", "prompt_ids": [-5]})}),
        (k.requests, {b"x": b"no payload field"}),
        (k.draft("drafter-0"), {b"d": msgpack.packb({"v": V, "t": "draft_job", "request_id": "q"})}),
        (k.draft("drafter-0"), {b"d": msgpack.packb({"v": 9, "t": "draft_job"})}),
        (k.verify("verifier-0"), {b"d": msgpack.packb({"v": V, "t": "draft", "request_id": "q", "drafter": "x",
                                                       "epoch": 0})}),
        (k.verify("verifier-0"), {b"d": b"not msgpack at all"}),
    ]
    for stream, fields in junk:
        s.r.xadd(stream, fields)
    res = client.generate(zoo_prompts["code"][6], max_new_tokens=16)
    assert len(res.token_ids) >= 1
    wait_for(lambda: s.r.xlen(k.dlq) >= before + len(junk), 20, what="dead letters")
    letters = s.r.xrange(k.dlq)[-len(junk):]
    for _eid, fields in letters:
        assert fields[b"reason"] and fields[b"stream"]
    reasons = b" ".join(f[b"reason"] for _e, f in letters).decode()
    assert "not msgpack" in reasons and "schema version" in reasons and "outside the vocabulary" in reasons
    with pytest.raises(InvalidRequestError) as err:  # the malformed request's sender gets its typed error
        client.result("bad", timeout=20)
    assert "outside the vocabulary" in str(err.value)
    assert all(w["alive"] for w in [{"alive": wid in s.live_workers()} for wid in ("verifier-0", "drafter-0")])


def test_cancel_ends_promptly_and_frees_state(cluster, client, zoo_prompts):
    s = streams(cluster.url)
    rid = client.submit(zoo_prompts["records"][7], max_new_tokens=400, ignore_eos=True)
    wait_for(lambda: s.r.xlen(client.output_key(rid)) >= 2, 60, what="first chunks")
    t0 = time.monotonic()
    client.cancel(rid)
    with pytest.raises(RequestCancelledError):
        client.result(rid, timeout=30)
    assert time.monotonic() - t0 < 5
    wait_for(lambda: all(int(info.get("active", "1")) == 0 for info in s.live_workers().values()), 10,
             what="workers to free the request")


def test_timeout_ends_the_request_everywhere(cluster, client, zoo_prompts):
    s = streams(cluster.url)
    t0 = time.monotonic()
    with pytest.raises(RequestTimeoutError):
        client.generate(zoo_prompts["prose"][7], max_new_tokens=600, ignore_eos=True, timeout=1.5)
    assert time.monotonic() - t0 < 5
    wait_for(lambda: all(int(info.get("active", "1")) == 0 for info in s.live_workers().values()), 10,
             what="workers to free the request")


def test_cli_generate_and_status(cluster):
    from click.testing import CliRunner

    from cosine.cli import cli

    runner = CliRunner()
    out = runner.invoke(cli, ["generate", "def main(", "--redis-url", cluster.url, "--max-new-tokens", "12", "--json"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.output.strip().splitlines()[-1])
    assert res["finish_reason"] in ("stop", "length") and res["stats"]["drafts"] >= 1
    out = runner.invoke(cli, ["generate", "The ", "--redis-url", cluster.url, "--max-new-tokens", "8", "--stream"])
    assert out.exit_code == 0 and len(out.output) > 1
    out = runner.invoke(cli, ["status", "--redis-url", cluster.url, "--json"])
    snap = json.loads(out.output)
    assert {w["id"] for w in snap["workers"] if w["alive"]} >= {"verifier-0", "drafter-0"}
    assert any(st["stream"].endswith(":requests") for st in snap["streams"])


def test_no_workers():
    with LocalRedis() as empty, Client(empty.url) as c:
        with pytest.raises(NoWorkersError):
            c.generate("hello")


def test_sampled_proposals_over_the_wire(redis_server, zoo_engine, zoo_prompts, tmp_path):
    """Drafts sampled by the drafter travel with their (truncated) probabilities; the verifier's rejection
    sampling still reproduces the target's distribution (chi-square on the first token over many seeds)."""
    import numpy as np
    import torch
    from scipy.stats import chisquare

    from cosine.engine.sampling import probabilities

    prompt = "The assert statement"  # short: the test's cost is in the many requests, not in prefill
    n = 512
    with deployment(redis_server.url, verifier_args=["--proposal", "sampled", "--max-active", "64"],
                    prefix="sampled", log_dir=str(tmp_path)) as dep, Client(dep.url, prefix="sampled") as c:
        # A fixed length: 64 requests in a pass make plain steps pay on the CPU target, and adaptive control
        # would switch speculation off (in one run 9 of 1536 rounds carried a draft, none accepted).
        ids = [c.submit(prompt, max_new_tokens=3, temperature=1.0, seed=i, timeout=300, speculation=2)
               for i in range(n)]
        results = [c.result(rid, timeout=300) for rid in ids]
    assert sum(r.stats["accepted"] for r in results) > 0
    firsts = [r.token_ids[0] for r in results]
    tok_ids = zoo_engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target = zoo_engine.verifier.runner.model
    with torch.no_grad():
        logits = target(input_ids=torch.tensor([tok_ids], device=target.device)).logits[0, -1]
    p = probabilities(logits, SamplingParams(temperature=1.0)).double().cpu().numpy()
    obs = np.bincount(firsts, minlength=len(p)).astype(float)
    exp = p / p.sum() * n
    small = exp < 5
    obs_b, exp_b = np.append(obs[~small], obs[small].sum()), np.append(exp[~small], exp[small].sum())
    assert chisquare(obs_b, exp_b).pvalue > 1e-3
